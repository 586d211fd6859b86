//! Megatron's `MegatronPretrainingSampler` (dataloader_type "single"): consecutive global
//! batches starting at `consumed_samples`, each DP rank taking its micro-batch slice, so a
//! resumed run continues exactly where it stopped.
use anyhow::{ensure, Result};

/// Iterator of this rank's micro-batches of sample indices. `None` entries only appear in a
/// padded last batch (`pad_last_batch`) and stand for a padding sample (zero loss mask).
#[derive(Debug, Clone)]
pub struct PretrainingSampler {
    next: usize,
    total_samples: usize,
    micro_batch_size: usize,
    dp_rank: usize,
    dp_size: usize,
    drop_last: bool,
    pad_last_batch: bool,
}

impl PretrainingSampler {
    /// `MegatronPretrainingSampler(total_samples, consumed_samples, micro_batch_size,
    /// data_parallel_rank, data_parallel_size, drop_last)`; `pad_last_batch` pads a final
    /// partial global batch with `None` (Megatron's `pad_samples_to_global_batch_size`).
    pub fn new(
        total_samples: usize,
        consumed_samples: usize,
        micro_batch_size: usize,
        dp_rank: usize,
        dp_size: usize,
        drop_last: bool,
        pad_last_batch: bool,
    ) -> Result<Self> {
        super::check_geometry(total_samples, micro_batch_size, dp_rank, dp_size)?;
        ensure!(
            consumed_samples < total_samples,
            "consumed_samples {consumed_samples} >= dataset size {total_samples}: nothing left to train on"
        );
        Ok(PretrainingSampler {
            next: consumed_samples,
            total_samples,
            micro_batch_size,
            dp_rank,
            dp_size,
            drop_last,
            pad_last_batch,
        })
    }
}

impl Iterator for PretrainingSampler {
    type Item = Vec<Option<usize>>;

    fn next(&mut self) -> Option<Self::Item> {
        let global = self.micro_batch_size * self.dp_size;
        let remaining = self.total_samples.saturating_sub(self.next);
        if remaining == 0 || (remaining < global && self.drop_last) {
            return None;
        }
        let batch: Vec<Option<usize>> = (self.next..self.next + global)
            .map(|i| (i < self.total_samples).then_some(i))
            .collect();
        self.next += global.min(remaining);
        let start = self.dp_rank * self.micro_batch_size;
        if remaining >= global || self.pad_last_batch {
            return Some(batch[start..start + self.micro_batch_size].to_vec());
        }
        // Unpadded partial batch: Python slices past the end yield shorter (maybe empty) lists.
        let real = &batch[..remaining];
        Some(real[start.min(remaining)..(start + self.micro_batch_size).min(remaining)].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: PretrainingSampler) -> Vec<Vec<Option<usize>>> {
        s.collect()
    }

    #[test]
    fn shards_by_rank_and_resumes() {
        // 10 samples, mbs 2, dp 2: global batches [0..4), [4..8); 8,9 dropped.
        let r0 = all(PretrainingSampler::new(10, 0, 2, 0, 2, true, false).unwrap());
        let r1 = all(PretrainingSampler::new(10, 0, 2, 1, 2, true, false).unwrap());
        assert_eq!(r0, vec![vec![Some(0), Some(1)], vec![Some(4), Some(5)]]);
        assert_eq!(r1, vec![vec![Some(2), Some(3)], vec![Some(6), Some(7)]]);
        // Resuming after one global batch continues at sample 4.
        let r = all(PretrainingSampler::new(10, 4, 2, 1, 2, true, false).unwrap());
        assert_eq!(r, vec![vec![Some(6), Some(7)]]);
        // Keeping the last partial batch, with and without padding.
        let r = all(PretrainingSampler::new(10, 8, 2, 1, 2, false, false).unwrap());
        assert_eq!(r, vec![Vec::<Option<usize>>::new()]);
        let r = all(PretrainingSampler::new(10, 8, 2, 1, 2, false, true).unwrap());
        assert_eq!(r, vec![vec![None, None]]);
        let r = all(PretrainingSampler::new(10, 8, 2, 0, 2, false, true).unwrap());
        assert_eq!(r, vec![vec![Some(8), Some(9)]]);
        assert!(PretrainingSampler::new(10, 10, 2, 0, 2, true, false).is_err());
        assert!(PretrainingSampler::new(10, 0, 2, 2, 2, true, false).is_err());
    }
}
