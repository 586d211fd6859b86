//! Building configs and trainers for the tiny CPU recipe, as `mbridge pretrain` does.
#![allow(dead_code)]

use candle_core::Device;
use mbridge::config::recipes::Task;
use mbridge::config::show::{render, ShowOptions};
use mbridge::config::{finalize, load, ConfigRequest, LoadedConfig};
use mbridge::parallel::comm::LocalWorld;
use mbridge::parallel::{ProcessGroups, Topology};
use mbridge::train::trainer::{TrainOutcome, Trainer};
use std::time::Duration;

/// `tiny_llama` pretraining with these overrides: the loaded config and the TOML it renders
/// to (what a run records as `run_config.toml`).
pub fn try_tiny_config<S: AsRef<str>>(overrides: &[S]) -> anyhow::Result<(LoadedConfig, String)> {
    let req = ConfigRequest {
        recipe: Some("tiny_llama".into()),
        task: Some(Task::Pretrain),
        overrides: overrides.iter().map(|s| s.as_ref().to_string()).collect(),
        ..Default::default()
    };
    let loaded = load(&req)?;
    let toml = render(&loaded.cfg, &loaded.raw, None, ShowOptions::default());
    Ok((loaded, toml))
}

/// [`try_tiny_config`] for overrides that must load.
pub fn tiny_config<S: AsRef<str>>(overrides: &[S]) -> (LoadedConfig, String) {
    try_tiny_config(overrides).unwrap()
}

/// `tiny_llama` with these overrides: load, finalize, and build the trainer on the CPU.
pub fn tiny_trainer(overrides: &[String]) -> anyhow::Result<Trainer> {
    let (loaded, toml) = try_tiny_config(overrides)?;
    let fin = finalize(loaded.cfg, None, None)?;
    Trainer::new(fin, toml, Device::Cpu)
}

/// Trains `world` ranks of `loaded` (threads on the in-process CPU backend), as
/// `mbridge pretrain --nproc-per-node world` does with processes; outcomes in rank order.
pub fn train_ranks(
    world: usize,
    loaded: &LoadedConfig,
    toml: &str,
) -> anyhow::Result<Vec<TrainOutcome>> {
    LocalWorld::run(world, Duration::from_secs(300), |rank, lw| {
        let fin = finalize(loaded.cfg.clone(), Some(world), None)?;
        let topo = Topology::from_config(&fin.cfg.model, &fin.cfg.dist, world)?;
        let groups = ProcessGroups::local(lw, topo, rank)?;
        Trainer::new_rank(fin, toml.to_string(), Device::Cpu, Some(groups))?.train()
    })
}
