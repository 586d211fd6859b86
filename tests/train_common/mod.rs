//! Building a single-process `Trainer` for the tiny CPU recipe, as `mbridge pretrain` does.

use candle_core::Device;
use mbridge::config::recipes::Task;
use mbridge::config::show::{render, ShowOptions};
use mbridge::config::{finalize, load, ConfigRequest};
use mbridge::train::trainer::Trainer;

/// `tiny_llama` with these overrides: load, finalize, and build the trainer on the CPU.
pub fn tiny_trainer(overrides: &[String]) -> anyhow::Result<Trainer> {
    let req = ConfigRequest {
        recipe: Some("tiny_llama".into()),
        task: Some(Task::Pretrain),
        overrides: overrides.to_vec(),
        ..Default::default()
    };
    let loaded = load(&req)?;
    let fin = finalize(loaded.cfg.clone(), None, None)?;
    let toml = render(&loaded.cfg, &loaded.raw, None, ShowOptions::default());
    Trainer::new(fin, toml, Device::Cpu)
}
