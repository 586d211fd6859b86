//! The arguments every config-consuming command shares: recipe, files, overrides.

use std::path::PathBuf;

use crate::config::peft::PeftScheme;
use crate::config::recipes::Task;
use crate::config::ConfigRequest;

/// `--recipe`, `--config-file` and trailing dotted overrides.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Recipe name (`llama3_8b`, `llama3_8b/sft`) or path to a recipe TOML.
    #[arg(long, short = 'r')]
    pub recipe: Option<String>,
    /// TOML file merged over the recipe (repeatable; later files win).
    #[arg(long = "config-file", short = 'c')]
    pub config_files: Vec<PathBuf>,
    /// Overrides: `a.b=v` (existing key), `+a.b=v` (add), `++a.b=v` (set or add), `~a.b` (reset).
    #[arg(value_name = "OVERRIDE")]
    pub overrides: Vec<String>,
}

impl ConfigArgs {
    /// The request for [`crate::config::load`].
    pub fn request(&self, task: Task, peft: Option<PeftScheme>) -> ConfigRequest {
        ConfigRequest {
            recipe: self.recipe.clone(),
            task: Some(task),
            config_files: self.config_files.clone(),
            peft,
            overrides: self.overrides.clone(),
        }
    }
}

/// `--world-size`: how many ranks the run will have (default: TP·PP·CP, or WORLD_SIZE).
pub fn world_size(flag: Option<usize>) -> Option<usize> {
    flag.or_else(|| std::env::var("WORLD_SIZE").ok().and_then(|v| v.parse().ok()))
}
