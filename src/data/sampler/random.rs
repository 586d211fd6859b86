//! dataloader_type "cyclic": Megatron Bridge's `MegatronPretrainingRandomSampler` behind
//! `cyclic_iter`, i.e. a fresh torch-seeded permutation every epoch, forever.
//!
//! The epoch and the offset inside it are derived from `consumed_samples` alone, so a resumed
//! run (or a validation pass rebuilt from `consumed_valid_samples`) continues the same order.

use anyhow::{ensure, Result};

use super::torch_rng::randperm;

/// Iterator of this rank's micro-batches (never ends: epochs repeat with new permutations).
#[derive(Debug, Clone)]
pub struct RandomSampler {
    total_samples: usize,
    consumed_samples: usize,
    micro_batch_size: usize,
    dp_rank: usize,
    dp_size: usize,
    data_sharding: bool,
    /// The current epoch's remaining indices for this rank, consumed from the front.
    pending: std::collections::VecDeque<usize>,
}

impl RandomSampler {
    /// `MegatronPretrainingRandomSampler(dataset, total_samples, consumed_samples,
    /// micro_batch_size, data_parallel_rank, data_parallel_size, data_sharding)`.
    pub fn new(
        total_samples: usize,
        consumed_samples: usize,
        micro_batch_size: usize,
        dp_rank: usize,
        dp_size: usize,
        data_sharding: bool,
    ) -> Result<Self> {
        super::check_geometry(total_samples, micro_batch_size, dp_rank, dp_size)?;
        ensure!(
            total_samples >= micro_batch_size * dp_size,
            "{total_samples} samples cannot fill one micro-batch of {micro_batch_size} on each \
             of {dp_size} data-parallel ranks"
        );
        Ok(RandomSampler {
            total_samples,
            consumed_samples,
            micro_batch_size,
            dp_rank,
            dp_size,
            data_sharding,
            pending: Default::default(),
        })
    }

    /// One `__iter__` of the Python sampler: this rank's index order for the current epoch.
    fn start_epoch(&mut self) -> Result<()> {
        let global = self.micro_batch_size * self.dp_size;
        let active_total = self.total_samples - self.total_samples % global;
        let epoch = self.consumed_samples / active_total;
        let in_epoch = self.consumed_samples % active_total;
        ensure!(
            in_epoch.is_multiple_of(global),
            "consumed samples {} are not a whole number of global micro-batches of {global}",
            self.consumed_samples
        );
        let order: Vec<usize> = if self.data_sharding {
            // Each rank shuffles inside its own contiguous bucket of the dataset.
            let bucket = (self.total_samples / global) * self.micro_batch_size;
            let offset = in_epoch / self.dp_size;
            let start = self.dp_rank * bucket;
            randperm(bucket, epoch as u64)?.into_iter().skip(offset).map(|x| start + x).collect()
        } else {
            // Megatron Bridge permutes the largest multiple of the micro-batch size (not of
            // the global batch), so ranks may see different epoch lengths; kept as is.
            let full = (self.total_samples / self.micro_batch_size) * self.micro_batch_size;
            let all = randperm(full, epoch as u64)?;
            all[in_epoch.min(full)..]
                .iter()
                .copied()
                .skip(self.dp_rank)
                .step_by(self.dp_size)
                .collect()
        };
        self.pending = order.into();
        Ok(())
    }

    /// This rank's next micro-batch.
    pub fn next_micro(&mut self) -> Result<Vec<usize>> {
        // An epoch's tail shorter than a micro-batch is dropped, as in Python.
        while self.pending.len() < self.micro_batch_size {
            self.start_epoch()?;
        }
        let batch: Vec<usize> = self.pending.drain(..self.micro_batch_size).collect();
        self.consumed_samples += self.micro_batch_size * self.dp_size;
        Ok(batch)
    }
}
