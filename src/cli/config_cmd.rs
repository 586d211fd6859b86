//! `mbridge config show`.

use super::config_args::{world_size, ConfigArgs};
use super::recipes_cmd::TaskArg;
use crate::config::peft::PeftScheme;
use crate::config::show::{render, ShowOptions};
use crate::config::{finalize, load};

/// `config` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved config as TOML with the source of each value.
    Show {
        #[command(flatten)]
        config: ConfigArgs,
        /// Which recipe of a model to resolve when --recipe is a bare model name.
        #[arg(long, value_enum, default_value = "pretrain")]
        task: TaskArg,
        /// Turn on PEFT adapters of this scheme.
        #[arg(long, value_enum)]
        peft: Option<PeftArg>,
        /// Print only values that differ from the defaults.
        #[arg(long)]
        only_changed: bool,
        /// Leave out the `# source` comments.
        #[arg(long)]
        no_sources: bool,
        /// Number of ranks to validate against (default: WORLD_SIZE or TP·PP·CP).
        #[arg(long)]
        world_size: Option<usize>,
    },
}

/// `--peft` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PeftArg {
    Lora,
    Dora,
    /// Also spelled as Megatron Bridge's scheme name, `canonical_lora`.
    #[value(alias = "canonical_lora")]
    CanonicalLora,
}

impl From<PeftArg> for PeftScheme {
    fn from(p: PeftArg) -> PeftScheme {
        match p {
            PeftArg::Lora => PeftScheme::Lora,
            PeftArg::Dora => PeftScheme::Dora,
            PeftArg::CanonicalLora => PeftScheme::CanonicalLora,
        }
    }
}

/// Run a `config` subcommand.
pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Show { config, task, peft, only_changed, no_sources, world_size: ws } => {
            let loaded = load(&config.request(task.into(), peft.map(Into::into)))?;
            let fin = finalize(loaded.cfg.clone(), world_size(ws), None)?;
            for w in loaded.raw.replaced_overrides().iter().chain(&fin.warnings) {
                tracing::warn!("{w}");
            }
            let opts = ShowOptions { only_changed, no_sources };
            super::out(&render(&loaded.cfg, &loaded.raw, Some(&fin.derived), opts));
            Ok(())
        }
    }
}
