//! megatron-core's `MockGPTLowLevelDataset`: synthetic documents used when no blend is given.
use anyhow::{ensure, Result};

use super::gpt_dataset::LowLevelDataset;
use super::numpy_rng::Pcg64Generator;

/// `MockGPTLowLevelDataset.seed`
pub const MOCK_SEED: u64 = 0;
/// `MockGPTLowLevelDataset.size`
pub const MOCK_SIZE: usize = 100_000;
/// `MockGPTLowLevelDataset.max_sequence_length`
pub const MOCK_MAX_SEQUENCE_LENGTH: i32 = 4096;

/// Document `i` is `(1..len) % vocab_size` followed by EOD, with `len` drawn by
/// `numpy.random.default_rng(0).integers(1, 4096, size=100000, dtype=int32)`.
#[derive(Debug, Clone)]
pub struct MockLowLevelDataset {
    vocab_size: i64,
    eod: i64,
    lengths: Vec<i32>,
}

impl MockLowLevelDataset {
    /// The mock dataset for a tokenizer with `vocab_size` ids and EOD `eod`.
    pub fn new(vocab_size: usize, eod: i64) -> Result<Self> {
        ensure!(vocab_size > 0, "mock data needs a positive vocab size");
        let lengths =
            Pcg64Generator::new(MOCK_SEED).integers_i32(1, MOCK_MAX_SEQUENCE_LENGTH, MOCK_SIZE);
        Ok(MockLowLevelDataset { vocab_size: vocab_size as i64, eod, lengths })
    }
}

impl LowLevelDataset for MockLowLevelDataset {
    fn path_prefix(&self) -> String {
        "mock".into()
    }
    fn sequence_lengths(&self) -> &[i32] {
        &self.lengths
    }
    fn get(&self, idx: usize, offset: usize, length: Option<usize>) -> Result<Vec<i64>> {
        let len = self.lengths[idx] as usize;
        // Python slicing of the document clamps at its end.
        let end = length.map_or(len, |l| (offset + l).min(len));
        Ok((offset..end)
            .map(|i| if i + 1 == len { self.eod } else { (i as i64 + 1) % self.vocab_size })
            .collect())
    }
    fn is_mock(&self) -> bool {
        true
    }
}
