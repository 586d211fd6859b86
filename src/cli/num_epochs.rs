//! `train.num_epochs` for finetuning: Megatron Bridge's `_resolve_num_epochs`. The finite SFT
//! training split is built first (without target sizes) and its length sets
//! `train.train_iters = ceil(num_epochs · ceil(samples / global_batch_size))`; the run then
//! goes on as an iteration-based one. Only finite SFT data with the `batch` loader qualifies,
//! as in Megatron Bridge (other datasets build however many samples they are asked for).

use crate::config::dataset::DatasetKind;
use crate::config::LoadedConfig;
use crate::data::sft::{build_sft_datasets, SftBuildOptions};
use crate::train::datasets::tokenizer_from_config;
use anyhow::{bail, Context, Result};

/// `loaded` with `train.num_epochs` turned into `train.train_iters` (unchanged without it).
/// `report` prints Megatron Bridge's line about the resolution.
pub fn resolve(mut loaded: LoadedConfig, report: bool) -> Result<LoadedConfig> {
    let cfg = &loaded.cfg;
    let Some(epochs) = cfg.train.num_epochs else { return Ok(loaded) };
    if cfg.dataset.kind() != DatasetKind::Finetuning {
        bail!(
            "`train.num_epochs` is only supported for finite SFT datasets (`dataset.dataset_root`), \
             because other datasets build a requested number of samples instead of exposing \
             their true size; set `train.train_iters` or `train.train_samples`"
        );
    }
    if cfg.dataset.dataloader_type.as_deref().is_some_and(|t| t != "batch") {
        bail!("`train.num_epochs` is currently supported only with `dataset.dataloader_type = \"batch\"`");
    }
    if !(epochs.is_finite() && epochs > 0.0) {
        bail!("`train.num_epochs` must be a positive number (got {epochs})");
    }
    if cfg.train.train_iters.is_some() || cfg.train.train_samples.is_some() {
        bail!("set only one of `train.train_iters`, `train.train_samples` and `train.num_epochs`");
    }
    let gbs = cfg
        .train
        .global_batch_size
        .context("`train.global_batch_size` must be set when using `train.num_epochs`")?;
    let tokenizer = tokenizer_from_config(cfg)?;
    let opts = SftBuildOptions::from_config(cfg)?;
    let sets = build_sft_datasets(&cfg.dataset, tokenizer.as_ref(), &opts)
        .context("building the SFT training split to count its samples (train.num_epochs)")?;
    let samples = sets.train.len();
    if samples == 0 {
        bail!("`train.num_epochs` needs a training split with at least one sample");
    }
    let per_epoch = samples.div_ceil(gbs.max(1));
    let iters = (epochs * per_epoch as f64).ceil() as usize;
    if report {
        println!(
            "Setting training iterations to {iters} based on {epochs} epochs, {samples} train \
             samples, {per_epoch} iterations per epoch, and global batch size {gbs}"
        );
    }
    loaded.cfg.train.train_iters = Some(iters);
    loaded.cfg.train.num_epochs = None;
    Ok(loaded)
}
