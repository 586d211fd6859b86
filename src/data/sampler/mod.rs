//! Batch samplers of Megatron Bridge's data loaders: which sample indices each data-parallel
//! rank reads at every micro-batch, resumable from a consumed-samples count.
//!
//! * `single` — [`PretrainingSampler`]: consecutive global batches, one pass (pretraining).
//! * `cyclic` — [`RandomSampler`]: a torch-seeded permutation per epoch, forever (also what
//!   Megatron Bridge uses for the validation split of GPT datasets).
//! * `batch` — [`GlobalBatchSampler`]: whole global batches from a per-epoch shuffled order,
//!   interleaved over DP ranks, forever (finetuning).

mod global_batch;
mod random;
mod single;
pub mod torch_rng;

use anyhow::{bail, ensure, Result};

pub use global_batch::{GlobalBatchOptions, GlobalBatchSampler};
pub use random::RandomSampler;
pub use single::PretrainingSampler;

use super::builder::PretrainDataset;
use super::gpt_dataset::Sample;

/// The argument checks every sampler kind shares (Megatron's sampler asserts).
fn check_geometry(
    total: usize,
    micro_batch_size: usize,
    dp_rank: usize,
    dp_size: usize,
) -> Result<()> {
    ensure!(total > 0, "no samples to draw from");
    ensure!(micro_batch_size > 0 && dp_size > 0, "micro batch size and DP size must be positive");
    ensure!(dp_rank < dp_size, "DP rank {dp_rank} out of range for DP size {dp_size}");
    Ok(())
}

/// `dataset.dataloader_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoaderKind {
    /// One sequential pass.
    Single,
    /// Random order per epoch, cycling.
    Cyclic,
    /// Shuffled global batches, cycling.
    Batch,
}

impl LoaderKind {
    /// Parses `dataset.dataloader_type`; `None` takes `default`.
    pub fn parse(value: Option<&str>, default: LoaderKind) -> Result<LoaderKind> {
        Ok(match value {
            None => default,
            Some("single") => LoaderKind::Single,
            Some("cyclic") => LoaderKind::Cyclic,
            Some("batch") => LoaderKind::Batch,
            Some("external") => bail!(
                "dataset.dataloader_type \"external\" hands a user-built Python data loader to the \
                 trainer; mbridge has none: use \"single\", \"cyclic\" or \"batch\""
            ),
            Some(other) => bail!(
                "dataset.dataloader_type {other:?} is not one of \"single\", \"cyclic\", \"batch\""
            ),
        })
    }
}

/// Geometry and options shared by every sampler kind.
#[derive(Debug, Clone, Copy)]
pub struct SamplerSpec {
    /// Samples in the split.
    pub total_samples: usize,
    /// Samples of this split consumed before (resume point).
    pub consumed_samples: usize,
    /// Rows per micro-batch.
    pub micro_batch_size: usize,
    /// Rows per global batch (all DP ranks, all micro-batches).
    pub global_batch_size: usize,
    /// This rank's DP index.
    pub dp_rank: usize,
    /// DP size.
    pub dp_size: usize,
    /// Drop a partial last batch (else: `single` yields it short, `batch` pads it).
    pub drop_last: bool,
    /// `dataset.data_sharding` (cyclic: shuffle within per-rank buckets).
    pub data_sharding: bool,
    /// Shuffle seed of the `batch` sampler.
    pub seed: u64,
}

/// A sampler of any kind, yielding this rank's micro-batches of sample indices.
#[derive(Debug, Clone)]
pub enum DataSampler {
    /// `single`.
    Single(PretrainingSampler),
    /// `cyclic`.
    Cyclic(RandomSampler),
    /// `batch`.
    Batch(GlobalBatchSampler),
}

impl DataSampler {
    /// The sampler of `kind` for `spec`.
    pub fn new(kind: LoaderKind, spec: SamplerSpec) -> Result<Self> {
        let s = spec;
        Ok(match kind {
            LoaderKind::Single => DataSampler::Single(PretrainingSampler::new(
                s.total_samples,
                s.consumed_samples,
                s.micro_batch_size,
                s.dp_rank,
                s.dp_size,
                s.drop_last,
                // Megatron Bridge's `single` yields a short last batch, never a padded one.
                false,
            )?),
            LoaderKind::Cyclic => DataSampler::Cyclic(RandomSampler::new(
                s.total_samples,
                s.consumed_samples,
                s.micro_batch_size,
                s.dp_rank,
                s.dp_size,
                s.data_sharding,
            )?),
            LoaderKind::Batch => DataSampler::Batch(GlobalBatchSampler::new(
                s.total_samples,
                s.consumed_samples,
                s.micro_batch_size,
                s.global_batch_size,
                s.dp_rank,
                s.dp_size,
                GlobalBatchOptions { drop_last: s.drop_last, shuffle: true, seed: s.seed },
            )?),
        })
    }

    /// This rank's next micro-batch (`None` entries are padding samples); `Ok(None)` once a
    /// one-pass (`single`) sampler is exhausted.
    pub fn next_micro(&mut self) -> Result<Option<Vec<Option<usize>>>> {
        Ok(match self {
            DataSampler::Single(s) => s.next(),
            DataSampler::Cyclic(s) => Some(s.next_micro()?.into_iter().map(Some).collect()),
            DataSampler::Batch(s) => Some(s.next_micro()?),
        })
    }
}

/// A micro-batch as flat row-major `[batch, seq_length]` arrays.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Rows in the batch.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_length: usize,
    /// Input ids.
    pub tokens: Vec<i64>,
    /// Targets.
    pub labels: Vec<i64>,
    /// Loss weights.
    pub loss_mask: Vec<f32>,
    /// Position ids.
    pub position_ids: Vec<i64>,
}

/// Fetch and stack the samples of one micro-batch (`None` ⇒ padding sample).
pub fn collate(ds: &PretrainDataset, indices: &[Option<usize>]) -> Result<Batch> {
    let mut b = Batch { batch_size: indices.len(), ..Default::default() };
    for idx in indices {
        let s: Sample = match idx {
            Some(i) => ds.get(*i)?,
            None => ds.padding_sample()?,
        };
        b.seq_length = s.tokens.len();
        b.tokens.extend(s.tokens);
        b.labels.extend(s.labels);
        b.loss_mask.extend(s.loss_mask);
        b.position_ids.extend(s.position_ids);
    }
    Ok(b)
}
