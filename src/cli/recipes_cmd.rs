//! `mbridge recipes list|show`.

use crate::config::recipes::{self, RecipeRef, Task};
use crate::config_err;

/// `recipes` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RecipesCommand {
    /// Names, tasks and one-line descriptions of the shipped recipes.
    List,
    /// Print a recipe's TOML as shipped (`llama3_8b` = its pretrain recipe, or `llama3_8b/sft`).
    Show {
        name: String,
        /// Print the recipe of this task when NAME is a bare model name.
        #[arg(long, value_enum, default_value = "pretrain")]
        task: TaskArg,
    },
}

/// Task names on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TaskArg {
    Pretrain,
    Sft,
    Peft,
}

impl From<TaskArg> for Task {
    fn from(t: TaskArg) -> Task {
        match t {
            TaskArg::Pretrain => Task::Pretrain,
            TaskArg::Sft => Task::Sft,
            TaskArg::Peft => Task::Peft,
        }
    }
}

/// Run a `recipes` subcommand.
pub fn run(cmd: RecipesCommand) -> anyhow::Result<()> {
    match cmd {
        RecipesCommand::List => {
            let all = recipes::list();
            let width = all.iter().map(|r| r.model.len()).max().unwrap_or(0);
            let mut text = format!("{:width$}  {:8}  description\n", "recipe", "task");
            for r in all {
                text += &format!("{:width$}  {:8}  {}\n", r.model, r.task, r.description);
            }
            super::out(&text);
            Ok(())
        }
        RecipesCommand::Show { name, task } => {
            let text = match recipes::resolve(&name, task.into())? {
                RecipeRef::Embedded(n) => recipes::embedded_text(&n)
                    .ok_or_else(|| config_err!("unknown recipe `{n}`"))?
                    .to_string(),
                RecipeRef::File(p) => std::fs::read_to_string(&p)
                    .map_err(|e| config_err!("cannot read `{}`: {e}", p.display()))?,
            };
            super::out(&text);
            Ok(())
        }
    }
}
