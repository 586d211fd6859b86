//! dataloader_type "batch": Megatron Bridge's `MegatronPretrainingBatchSampler` behind
//! `cyclic_iter` (the finetuning default).
//!
//! Whole global batches are drawn from a per-epoch order (a torch-seeded permutation with
//! seed `seed + epoch` when shuffling), each DP rank takes every `dp_size`-th index of the
//! global batch, and its share is cut into consecutive micro-batches. A partial last global
//! batch is dropped, or kept and padded with `None` (padding samples) when `drop_last` is off.

use std::collections::VecDeque;

use anyhow::{ensure, Result};

use super::torch_rng::randperm;

/// Options of [`GlobalBatchSampler`] beyond the batch geometry.
#[derive(Debug, Clone, Copy)]
pub struct GlobalBatchOptions {
    /// Drop a partial last global batch (else pad it to a full one).
    pub drop_last: bool,
    /// Reshuffle every epoch (`seed + epoch`); false keeps dataset order.
    pub shuffle: bool,
    /// Base shuffle seed (Megatron Bridge passes the dataset seed).
    pub seed: u64,
}

/// Iterator of this rank's micro-batches (never ends: epochs repeat).
#[derive(Debug, Clone)]
pub struct GlobalBatchSampler {
    total_samples: usize,
    consumed_samples: usize,
    micro_batch_size: usize,
    global_batch_size: usize,
    dp_rank: usize,
    dp_size: usize,
    opts: GlobalBatchOptions,
    /// Index order of the current epoch from the next global batch on.
    epoch_order: VecDeque<usize>,
    /// This rank's share of the current global batch, not yet handed out.
    share: VecDeque<Option<usize>>,
}

impl GlobalBatchSampler {
    /// Sampler resuming after `consumed_samples` (a multiple of the global batch size).
    pub fn new(
        total_samples: usize,
        consumed_samples: usize,
        micro_batch_size: usize,
        global_batch_size: usize,
        dp_rank: usize,
        dp_size: usize,
        opts: GlobalBatchOptions,
    ) -> Result<Self> {
        super::check_geometry(total_samples, micro_batch_size, dp_rank, dp_size)?;
        ensure!(
            global_batch_size.is_multiple_of(micro_batch_size * dp_size),
            "global batch size {global_batch_size} is not divisible by micro batch size \
             {micro_batch_size} × data-parallel size {dp_size}"
        );
        ensure!(
            !opts.drop_last || total_samples >= global_batch_size,
            "{total_samples} samples cannot fill one global batch of {global_batch_size} \
             (set dataset.drop_last=false to pad it)"
        );
        Ok(GlobalBatchSampler {
            total_samples,
            consumed_samples,
            micro_batch_size,
            global_batch_size,
            dp_rank,
            dp_size,
            opts,
            epoch_order: VecDeque::new(),
            share: VecDeque::new(),
        })
    }

    /// Samples one epoch accounts for (the unit of the epoch/offset arithmetic).
    fn active_total(&self) -> usize {
        let g = self.global_batch_size;
        if self.opts.drop_last {
            (self.total_samples / g) * g
        } else {
            self.total_samples.div_ceil(g) * g
        }
    }

    fn start_epoch(&mut self) -> Result<()> {
        let active = self.active_total();
        let epoch = self.consumed_samples / active;
        let in_epoch = self.consumed_samples % active;
        let order = if self.opts.shuffle {
            randperm(self.total_samples, self.opts.seed + epoch as u64)?
        } else {
            (0..self.total_samples).collect()
        };
        self.epoch_order = order.into_iter().skip(in_epoch).collect();
        Ok(())
    }

    /// Take the next global batch off the epoch order and keep this rank's share.
    fn next_global_batch(&mut self) -> Result<()> {
        let g = self.global_batch_size;
        loop {
            if self.epoch_order.len() >= g {
                let batch: Vec<usize> = self.epoch_order.drain(..g).collect();
                self.share = batch
                    .iter()
                    .skip(self.dp_rank)
                    .step_by(self.dp_size)
                    .map(|&i| Some(i))
                    .collect();
                self.consumed_samples += g;
                return Ok(());
            }
            if !self.epoch_order.is_empty() && !self.opts.drop_last {
                let batch: Vec<usize> = self.epoch_order.drain(..).collect();
                let mut share: VecDeque<Option<usize>> = batch
                    .iter()
                    .skip(self.dp_rank)
                    .step_by(self.dp_size)
                    .map(|&i| Some(i))
                    .collect();
                share.resize(g / self.dp_size, None);
                self.share = share;
                self.consumed_samples += g;
                return Ok(());
            }
            self.start_epoch()?;
        }
    }

    /// This rank's next micro-batch (`None` = padding sample).
    pub fn next_micro(&mut self) -> Result<Vec<Option<usize>>> {
        if self.share.is_empty() {
            self.next_global_batch()?;
        }
        Ok(self.share.drain(..self.micro_batch_size).collect())
    }
}
