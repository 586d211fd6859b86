//! From the config to the tokenizer and the train/valid/test datasets of a pretraining run.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::config::dataset::{Blend as CfgBlend, DatasetKind};
use crate::config::tokenizer::TokenizerType;
use crate::config::{ConfigContainer, Derived};
use crate::data::sampler::{collate, Batch, DataSampler, LoaderKind, SamplerSpec};
use crate::data::sft::{build_sft_datasets, SftBuildOptions, SftSplit};
use crate::data::tokenizer::{build_tokenizer, dataset_pad_id, Tokenizer, TokenizerSpec};
use crate::data::{
    build_gpt_datasets, parse_blend, Blend, BlendSpec, GptDatasetParams, PretrainDataset,
};
use crate::model::{HostStats, Microbatch};

/// The tokenizer described by `tokenizer.*`.
pub fn tokenizer_from_config(cfg: &ConfigContainer) -> Result<Box<dyn Tokenizer>> {
    let t = &cfg.tokenizer;
    let ty = t.tokenizer_type.map(|ty| format!("{ty:?}"));
    let spec = TokenizerSpec {
        tokenizer_type: ty,
        tokenizer_model: t.tokenizer_model.as_ref().map(PathBuf::from),
        vocab_file: t.vocab_file.as_ref().map(PathBuf::from),
        merge_file: t.merge_file.as_ref().map(PathBuf::from),
        vocab_size: t.vocab_size,
    };
    if t.tokenizer_type == Some(TokenizerType::HuggingFaceTokenizer) && t.tokenizer_model.is_none()
    {
        bail!("`tokenizer.tokenizer_model` must name a tokenizer.json or HF model directory");
    }
    build_tokenizer(&spec).context("cannot build the tokenizer from `tokenizer.*`")
}

/// `train_valid_test_num_samples`: what each split must serve over the whole run. With
/// `validation.full_validation` the validation split has no target: one epoch of it is built
/// (megatron-core's `num_samples = None`).
pub fn split_sample_counts(cfg: &ConfigContainer, d: &Derived) -> [Option<usize>; 3] {
    let eval_iters = cfg.validation.eval_iters.unwrap_or(0);
    let evals = match cfg.validation.eval_interval {
        Some(every) if every > 0 => d.train_iters / every + 1,
        _ => 1,
    };
    let valid = eval_iters * d.eval_global_batch_size * evals;
    [
        Some(d.train_iters * d.global_batch_size),
        (!cfg.validation.full_validation).then_some(valid),
        Some(eval_iters * d.eval_global_batch_size),
    ]
}

/// Where a pretraining run's data comes from: `dataset.blend_per_split`, `blend` /
/// `data_path`, or megatron-core's mock data.
fn pretrain_blend(cfg: &ConfigContainer) -> Result<BlendSpec> {
    let ds = &cfg.dataset;
    Ok(match ds.kind() {
        DatasetKind::Mock => BlendSpec::Mock,
        DatasetKind::Finetuning => {
            bail!("`dataset.dataset_root` holds SFT data: build it with `build_run_datasets`")
        }
        DatasetKind::Pretraining => {
            match (&ds.blend_per_split, ds.blend.as_ref().or(ds.data_path.as_ref())) {
                (Some(per_split), _) => {
                    if per_split.len() != 3 {
                        bail!("`dataset.blend_per_split` needs 3 entries (train, valid, test), got {}", per_split.len());
                    }
                    let mut out = [None, None, None];
                    for (i, items) in per_split.iter().enumerate() {
                        if !items.is_empty() {
                            out[i] = Some(parse_blend(
                                &serde_json::to_value(items)?
                                    .as_array()
                                    .cloned()
                                    .unwrap_or_default(),
                            )?);
                        }
                    }
                    BlendSpec::PerSplit(out)
                }
                (None, Some(b)) => {
                    let items = match b {
                        CfgBlend::One(s) => vec![serde_json::Value::String(s.clone())],
                        CfgBlend::Many(v) => {
                            serde_json::to_value(v)?.as_array().cloned().unwrap_or_default()
                        }
                    };
                    BlendSpec::Blend(parse_blend(&items)?)
                }
                (None, None) => unreachable!("pretraining kind implies a blend"),
            }
        }
    })
}

/// The dataset parameters of a pretraining run.
fn gpt_params(cfg: &ConfigContainer, tokenizer: &dyn Tokenizer) -> GptDatasetParams {
    let ds = &cfg.dataset;
    GptDatasetParams {
        random_seed: ds.random_seed.unwrap_or(cfg.rng.seed) as u32,
        seq_length: cfg.model.seq_length,
        split: ds.split.clone(),
        add_extra_token_to_sequence: ds.add_extra_token_to_sequence,
        reset_position_ids: ds.reset_position_ids,
        reset_attention_mask: ds.reset_attention_mask,
        eod_mask_loss: ds.eod_mask_loss,
        drop_last_partial_validation_sequence: ds.drop_last_partial_validation_sequence,
        eod_id: tokenizer.eod(),
        pad_id: dataset_pad_id(tokenizer, false),
        path_to_cache: ds.path_to_cache.as_ref().map(PathBuf::from),
        mmap_bin_files: ds.mmap_bin_files,
        mid_level_dataset_surplus: ds.mid_level_dataset_surplus,
        vocab_size: Some(tokenizer.vocab_size()),
    }
}

/// Train, validation and test datasets of a pretraining (or mock) run.
pub fn build_pretrain_datasets(
    cfg: &ConfigContainer,
    d: &Derived,
    tokenizer: &dyn Tokenizer,
) -> Result<[Option<PretrainDataset>; 3]> {
    let blend = pretrain_blend(cfg)?;
    build_gpt_datasets(&gpt_params(cfg, tokenizer), &blend, split_sample_counts(cfg, d))
}

/// The validation split's datasets one by one, for `validation.multiple_validation_sets`
/// (megatron-core builds one per prefix of `blend_per_split[1]`, each one epoch), with the
/// blend of the other splits; None when the split is a single dataset, which the other
/// splits' build covers.
fn separate_validation_sets(
    cfg: &ConfigContainer,
    tokenizer: &dyn Tokenizer,
) -> Result<Option<(BlendSpec, Vec<PretrainDataset>)>> {
    if !cfg.validation.multiple_validation_sets || cfg.dataset.kind() != DatasetKind::Pretraining {
        return Ok(None);
    }
    let BlendSpec::PerSplit([train, Some(valid), test]) = pretrain_blend(cfg)? else {
        return Ok(None);
    };
    if valid.prefixes.len() < 2 {
        return Ok(None);
    }
    if valid.weights.is_some() {
        bail!(
            "`validation.multiple_validation_sets` evaluates each dataset of \
             `dataset.blend_per_split[1]` on its own: list their prefixes without weights"
        );
    }
    let params = gpt_params(cfg, tokenizer);
    valid
        .prefixes
        .iter()
        .map(|prefix| {
            let one = Blend { prefixes: vec![prefix.clone()], weights: None };
            let mut built = build_gpt_datasets(
                &params,
                &BlendSpec::PerSplit([None, Some(one), None]),
                [None; 3],
            )?;
            built[1].take().with_context(|| format!("validation set {prefix:?} is empty"))
        })
        .collect::<Result<Vec<_>>>()
        .map(|sets| Some((BlendSpec::PerSplit([train, None, test]), sets)))
}

/// A split the trainer draws micro-batches from: pretraining (GPT/blended/mock) or SFT data.
#[derive(Debug, Clone)]
pub enum RunDataset {
    Pretrain(PretrainDataset),
    /// SFT examples (or packed bins).
    Sft(SftSplit),
}

impl RunDataset {
    /// Samples the sampler may draw.
    pub fn len(&self) -> usize {
        match self {
            RunDataset::Pretrain(d) => d.len(),
            RunDataset::Sft(split) => split.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The micro-batch of these sample indices (None = a padding sample with no loss).
    pub fn microbatch(&self, indices: &[Option<usize>], device: &Device) -> Result<Microbatch> {
        match self {
            RunDataset::Pretrain(d) => to_microbatch(&collate(d, indices)?, device),
            RunDataset::Sft(split) => {
                let b = split.collate(indices)?;
                let mut mb = to_microbatch(b.batch(), device)?;
                // Packed bins: THD boundaries so examples never attend to each other. The model
                // hands them to the fused kernel (no s×s mask) or builds the block-diagonal
                // mask itself on the composite path.
                mb.cu_seqlens = b.cu_seqlens()?;
                Ok(mb)
            }
        }
    }
}

/// One validation set of a run, with the suffix of its loss's name: "" for the one set,
/// `-<name>` (`validation.validation_set_names`) or `-<index>` for each of several
/// (`validation.multiple_validation_sets`), as Megatron names them.
#[derive(Debug, Clone)]
pub struct ValidationSet {
    pub suffix: String,
    pub data: RunDataset,
}

/// The datasets a run trains and evaluates on.
#[derive(Debug, Clone, Default)]
pub struct RunSplits {
    pub train: Option<RunDataset>,
    /// Empty when the run has no validation data.
    pub valid: Vec<ValidationSet>,
    pub test: Option<RunDataset>,
}

/// The splits of any run ([`build_run_datasets`]), the validation split as separate sets
/// where `validation.multiple_validation_sets` asks for them.
pub fn build_run_splits(
    cfg: &ConfigContainer,
    d: &Derived,
    tokenizer: &dyn Tokenizer,
) -> Result<RunSplits> {
    let (train, sets, test) = match separate_validation_sets(cfg, tokenizer)? {
        Some((rest, sets)) => {
            // The other splits without the combined validation blend, which no one reads.
            let counts = split_sample_counts(cfg, d);
            let [train, _, test] = build_gpt_datasets(&gpt_params(cfg, tokenizer), &rest, counts)?;
            let pretrain = |s: Option<PretrainDataset>| s.map(RunDataset::Pretrain);
            (pretrain(train), sets.into_iter().map(RunDataset::Pretrain).collect(), pretrain(test))
        }
        None => {
            let [train, valid, test] = build_run_datasets(cfg, d, tokenizer)?;
            (train, valid.into_iter().collect::<Vec<_>>(), test)
        }
    };
    let v = &cfg.validation;
    if let Some(names) = &v.validation_set_names {
        if names.len() != sets.len() {
            bail!(
                "`validation.validation_set_names` has {} names for {} validation datasets",
                names.len(),
                sets.len()
            );
        }
    }
    let suffix = |i: usize| match (&v.validation_set_names, v.multiple_validation_sets) {
        (Some(names), _) => format!("-{}", names[i]),
        (None, true) => format!("-{i}"),
        (None, false) => String::new(),
    };
    let valid =
        sets.into_iter().enumerate().map(|(i, data)| ValidationSet { suffix: suffix(i), data });
    Ok(RunSplits { train, valid: valid.collect(), test })
}

/// The train/valid/test splits of any run: SFT data under `dataset.dataset_root`, else
/// pretraining or mock data.
pub fn build_run_datasets(
    cfg: &ConfigContainer,
    d: &Derived,
    tokenizer: &dyn Tokenizer,
) -> Result<[Option<RunDataset>; 3]> {
    if cfg.dataset.kind() != DatasetKind::Finetuning {
        return Ok(build_pretrain_datasets(cfg, d, tokenizer)?.map(|s| s.map(RunDataset::Pretrain)));
    }
    if cfg.train.num_epochs.is_some() {
        // The CLI turns it into `train.train_iters` first (`cli::num_epochs`).
        bail!("`train.num_epochs` must be resolved into `train.train_iters` before the datasets are built");
    }
    let opts = SftBuildOptions::from_config(cfg)?;
    let sets = build_sft_datasets(&cfg.dataset, tokenizer, &opts)?;
    if sets.train.is_empty() {
        bail!("`dataset.dataset_root` has no usable training examples");
    }
    // Epochs over the training split come from the (cycling) sampler, as in Megatron Bridge.
    let keep = |s: Option<SftSplit>| s.filter(|s| !s.is_empty()).map(RunDataset::Sft);
    Ok([Some(RunDataset::Sft(sets.train)), keep(sets.valid), keep(sets.test)])
}

/// The sampler of split `split` (0 train, 1 validation, 2 test) as Megatron Bridge's
/// `build_train_valid_test_data_loaders` picks it: `dataset.dataloader_type` (default
/// `single` for pretraining data, `batch` for SFT data), except that the validation split of
/// pretraining data is always `cyclic`; evaluation splits of SFT `batch` loaders keep (and
/// pad) their last partial batch.
pub fn sampler_for_split(
    cfg: &ConfigContainer,
    d: &Derived,
    split: usize,
    ds: &RunDataset,
    consumed_samples: usize,
    dp_rank: usize,
) -> Result<DataSampler> {
    let sft = matches!(ds, RunDataset::Sft(_));
    let (kind, drop_last) = loader_for_split(cfg, sft, split)?;
    let (mbs, gbs) = if split == 0 {
        (d.micro_batch_size, d.global_batch_size)
    } else {
        (d.eval_micro_batch_size, d.eval_global_batch_size)
    };
    // Megatron Bridge shuffles with the dataset's seed (`seed` for SFT, `random_seed` for GPT
    // datasets), falling back to the run's seed.
    let seed = if sft { cfg.dataset.seed } else { cfg.dataset.random_seed.unwrap_or(cfg.rng.seed) };
    let spec = SamplerSpec {
        total_samples: ds.len(),
        consumed_samples,
        micro_batch_size: mbs,
        global_batch_size: gbs,
        dp_rank,
        dp_size: d.data_parallel_size,
        drop_last,
        data_sharding: cfg.dataset.data_sharding,
        seed,
    };
    DataSampler::new(kind, spec).with_context(|| {
        let name = ["training", "validation", "test"][split];
        format!("cannot sample the {name} split ({} samples)", ds.len())
    })
}

/// Loader kind and `drop_last` of split `split` (see [`sampler_for_split`]).
fn loader_for_split(cfg: &ConfigContainer, sft: bool, split: usize) -> Result<(LoaderKind, bool)> {
    let default = if sft { LoaderKind::Batch } else { LoaderKind::Single };
    let configured = LoaderKind::parse(cfg.dataset.dataloader_type.as_deref(), default)?;
    let kind = if split == 1 && !sft { LoaderKind::Cyclic } else { configured };
    let drop_last =
        if split == 0 { cfg.dataset.drop_last } else { !(sft && kind == LoaderKind::Batch) };
    Ok((kind, drop_last))
}

/// Tensors of a collated batch (ids as u32, loss mask as f32).
pub fn to_microbatch(b: &Batch, device: &Device) -> Result<Microbatch> {
    let shape = (b.batch_size, b.seq_length);
    let ids = |v: &[i64]| -> Result<Vec<u32>> {
        v.iter()
            .map(|&x| {
                u32::try_from(x).with_context(|| format!("token id {x} is negative or too large"))
            })
            .collect()
    };
    let tensor = |v: Vec<u32>| Tensor::from_vec(v, shape, device);
    let (tokens, labels, positions) = (ids(&b.tokens)?, ids(&b.labels)?, ids(&b.position_ids)?);
    let host_stats = Some(HostStats::of(&tokens, Some(&positions), &labels, &b.loss_mask));
    Ok(Microbatch {
        tokens: tensor(tokens)?,
        labels: tensor(labels)?,
        loss_mask: Tensor::from_vec(b.loss_mask.clone(), shape, device)?,
        position_ids: Some(tensor(positions)?),
        attention_mask: None,
        cu_seqlens: None,
        host_stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaders_per_split_follow_megatron_bridge() {
        let mut cfg = ConfigContainer::default();
        // Pretraining data: `single` for train/test, validation always `cyclic`.
        assert_eq!(loader_for_split(&cfg, false, 0).unwrap(), (LoaderKind::Single, true));
        assert_eq!(loader_for_split(&cfg, false, 1).unwrap(), (LoaderKind::Cyclic, true));
        assert_eq!(loader_for_split(&cfg, false, 2).unwrap(), (LoaderKind::Single, true));
        // SFT data: `batch`; evaluation splits keep and pad their last global batch.
        assert_eq!(loader_for_split(&cfg, true, 0).unwrap(), (LoaderKind::Batch, true));
        assert_eq!(loader_for_split(&cfg, true, 1).unwrap(), (LoaderKind::Batch, false));
        cfg.dataset.dataloader_type = Some("cyclic".into());
        cfg.dataset.drop_last = false;
        assert_eq!(loader_for_split(&cfg, false, 0).unwrap(), (LoaderKind::Cyclic, false));
        assert_eq!(loader_for_split(&cfg, true, 2).unwrap(), (LoaderKind::Cyclic, true));
    }
}
