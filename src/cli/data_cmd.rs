//! `mbridge data show-samples`: the samples a run would train on, as the config resolves them.

use super::config_args::{world_size, ConfigArgs};
use crate::config::recipes::Task;
use crate::config::{finalize, load};
use crate::config_err;
use crate::data::show::render_samples;
use crate::train::datasets::{build_pretrain_datasets, tokenizer_from_config};

/// `data` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Print samples of the train/valid/test dataset built from a recipe and overrides.
    ShowSamples {
        #[command(flatten)]
        config: ConfigArgs,
        /// Number of samples to print.
        #[arg(long, default_value_t = 3)]
        count: usize,
        /// Index of the first sample.
        #[arg(long, default_value_t = 0)]
        start: usize,
        /// Which split: train, valid or test.
        #[arg(long, default_value = "train")]
        split: String,
        /// Number of ranks to size the datasets for (default: WORLD_SIZE or TP·PP·CP).
        #[arg(long)]
        world_size: Option<usize>,
    },
}

/// Run a `data` subcommand.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::ShowSamples { config, count, start, split, world_size: ws } => {
            let index = match split.as_str() {
                "train" => 0,
                "valid" | "validation" => 1,
                "test" => 2,
                other => {
                    return Err(config_err!(
                        "unknown --split `{other}`: expected train, valid or test"
                    )
                    .into())
                }
            };
            let loaded = load(&config.request(Task::Pretrain, None))?;
            let fin = finalize(loaded.cfg, world_size(ws), None)?;
            let tokenizer = tokenizer_from_config(&fin.cfg)?;
            let fin =
                finalize(fin.cfg, Some(fin.derived.world_size), Some(tokenizer.vocab_size()))?;
            let datasets = build_pretrain_datasets(&fin.cfg, &fin.derived, tokenizer.as_ref())?;
            let ds = datasets[index]
                .as_ref()
                .ok_or_else(|| config_err!("the {split} split is empty for this config"))?;
            super::out(&render_samples(ds, start, count, Some(tokenizer.as_ref()))?);
            Ok(())
        }
    }
}
