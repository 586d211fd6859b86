//! megatron-core `GPTDataset`: document, sample and shuffle indices (gpt-dataset.md §5–7).
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

use super::cache::{describe, CacheEntry};
pub use super::gpt_indices::{build_indices, GptIndices};
use super::gpt_indices::{load_cached, store_cached};
use super::indexed::IndexedDataset;
use super::split::Split;

/// A source of token sequences (Megatron's "low-level dataset").
pub trait LowLevelDataset: Send + Sync + std::fmt::Debug {
    /// Path prefix identifying the data (used in cache descriptions and directories).
    fn path_prefix(&self) -> String;
    /// Token count of every sequence.
    fn sequence_lengths(&self) -> &[i32];
    /// `length` tokens of sequence `idx` from `offset` (to its end when None).
    fn get(&self, idx: usize, offset: usize, length: Option<usize>) -> Result<Vec<i64>>;
    /// True for synthetic data, which is never cached (Megatron caches only real prefixes).
    fn is_mock(&self) -> bool {
        false
    }
}

impl LowLevelDataset for IndexedDataset {
    fn path_prefix(&self) -> String {
        self.prefix().display().to_string()
    }
    fn sequence_lengths(&self) -> &[i32] {
        IndexedDataset::sequence_lengths(self)
    }
    fn get(&self, idx: usize, offset: usize, length: Option<usize>) -> Result<Vec<i64>> {
        IndexedDataset::get(self, idx, offset, length)
    }
}

/// Dataset settings, named as Megatron Bridge's `GPTDatasetConfig` (`dataset.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct GptDatasetParams {
    /// `dataset.random_seed` (recipes: `rng.seed`, 1234).
    pub random_seed: u32,
    /// `dataset.seq_length`: tokens per sample.
    pub seq_length: usize,
    /// `dataset.split`, e.g. "969,30,1"; None means "1,1,1" (mock) or blend_per_split.
    pub split: Option<String>,
    /// Samples overlap by one token so labels are the next tokens (default true).
    pub add_extra_token_to_sequence: bool,
    /// Restart positions after each EOD.
    pub reset_position_ids: bool,
    /// Block attention across EODs (see [`ltor_attention_mask`]; samples carry no mask).
    pub reset_attention_mask: bool,
    /// Zero the loss on EOD tokens.
    pub eod_mask_loss: bool,
    /// Whether the last partial validation sample is dropped (default true).
    pub drop_last_partial_validation_sequence: bool,
    /// Tokenizer EOD id.
    pub eod_id: i64,
    /// Tokenizer pad id, or -1 when it has none (Megatron's `_PAD_TOKEN_ID`).
    pub pad_id: i64,
    /// Directory for index caches; None ⇒ `{prefix}/cache/GPTDataset_indices`.
    pub path_to_cache: Option<PathBuf>,
    /// Kept for config parity: mbridge always memory-maps (reads are zero-copy either way).
    pub mmap_bin_files: bool,
    /// Extra fraction of samples each blended child builds (default 0.005).
    pub mid_level_dataset_surplus: f64,
    /// Tokenizer vocabulary size (unpadded). Required by the mock dataset (its tokens wrap
    /// modulo it); when set, fetched samples with a token >= it are an error.
    pub vocab_size: Option<usize>,
}

impl Default for GptDatasetParams {
    fn default() -> Self {
        GptDatasetParams {
            random_seed: 1234,
            seq_length: 1024,
            split: Some("969,30,1".into()),
            add_extra_token_to_sequence: true,
            reset_position_ids: false,
            reset_attention_mask: false,
            eod_mask_loss: false,
            drop_last_partial_validation_sequence: true,
            eod_id: 0,
            pad_id: -1,
            path_to_cache: None,
            mmap_bin_files: true,
            mid_level_dataset_surplus: 0.005,
            vocab_size: None,
        }
    }
}

/// One training sample, as `GPTDataset.__getitem__` returns it (without attention mask).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Input ids, `seq_length` long (pad positions set to 0).
    pub tokens: Vec<i64>,
    /// Target ids (pad positions set to 0).
    pub labels: Vec<i64>,
    /// 1.0 where the loss counts.
    pub loss_mask: Vec<f32>,
    /// Position ids (reset after EOD when `reset_position_ids`).
    pub position_ids: Vec<i64>,
}

/// `_get_ltor_masks_and_position_ids` loss mask and positions for `tokens`.
pub fn ltor_loss_mask_and_positions(
    tokens: &[i64],
    eod: i64,
    reset_position_ids: bool,
    eod_mask_loss: bool,
) -> (Vec<f32>, Vec<i64>) {
    let mut loss_mask: Vec<f32> =
        tokens.iter().map(|&t| if eod_mask_loss && t == eod { 0.0 } else { 1.0 }).collect();
    let mut pos: Vec<i64> = (0..tokens.len() as i64).collect();
    if reset_position_ids {
        let mut prev = 0i64;
        for i in 0..tokens.len() {
            if tokens[i] == eod {
                let shift = i as i64 + 1 - prev;
                pos[i + 1..].iter_mut().for_each(|p| *p -= shift);
                prev = i as i64 + 1;
            }
        }
    }
    loss_mask.truncate(tokens.len());
    (loss_mask, pos)
}

/// Causal attention mask `[L*L]`, `true = masked` (Megatron's convention); with
/// `reset_attention_mask` positions after an EOD cannot see positions up to it.
pub fn ltor_attention_mask(tokens: &[i64], eod: i64, reset_attention_mask: bool) -> Vec<bool> {
    let n = tokens.len();
    let mut allowed = vec![false; n * n];
    for r in 0..n {
        allowed[r * n..r * n + r + 1].iter_mut().for_each(|a| *a = true);
    }
    if reset_attention_mask {
        for i in (0..n).filter(|&i| tokens[i] == eod) {
            for r in i + 1..n {
                allowed[r * n..r * n + i + 1].iter_mut().for_each(|a| *a = false);
            }
        }
    }
    allowed.into_iter().map(|a| !a).collect()
}

/// A built GPTDataset for one split.
#[derive(Debug, Clone)]
pub struct GptDataset {
    low: Arc<dyn LowLevelDataset>,
    split: Split,
    num_samples: Option<usize>,
    params: GptDatasetParams,
    indices: Arc<GptIndices>,
    description: String,
}

impl GptDataset {
    /// Build (or load from cache) the dataset over sequence ids `seq_ids` of `low`.
    /// `split_matrix_desc` is the split matrix recorded in the description.
    pub fn new(
        low: Arc<dyn LowLevelDataset>,
        seq_ids: std::ops::Range<usize>,
        num_samples: Option<usize>,
        split: Split,
        split_matrix_desc: serde_json::Value,
        params: &GptDatasetParams,
    ) -> Result<Self> {
        let prefix = low.path_prefix();
        ensure!(
            !seq_ids.is_empty(),
            "the {} split of {prefix} is empty (sequences {seq_ids:?} of {}; split {:?}) but it is needed; \
             change dataset.split",
            split.name(),
            low.sequence_lengths().len(),
            params.split
        );
        let drop_last = split != Split::Valid || params.drop_last_partial_validation_sequence;
        let sizes = low.sequence_lengths();
        let n_tokens: i64 = sizes.iter().map(|&s| s as i64).sum();
        let desc = serde_json::json!({
            "class": "GPTDataset",
            "dataset_path": prefix,
            "num_samples": num_samples,
            "index_split": split.name(),
            "random_seed": params.random_seed,
            "sequence_length": params.seq_length,
            "split": params.split,
            "split_matrix": split_matrix_desc,
            "add_extra_token_to_sequence": params.add_extra_token_to_sequence,
            "drop_last_partial_sequence": drop_last,
            "low_level_dataset": {"num_sequences": sizes.len(), "num_tokens": n_tokens},
            "producer": "mbridge",
        });
        let description = describe(&desc);
        let cache_dir =
            if low.is_mock() {
                None
            } else {
                Some(params.path_to_cache.clone().unwrap_or_else(|| {
                    PathBuf::from(&prefix).join("cache").join("GPTDataset_indices")
                }))
            };
        let entry =
            cache_dir.map(|d| CacheEntry::new(&d, "GPTDataset", split.name(), description.clone()));
        let names = ["document_index", "sample_index", "shuffle_index"];
        let ids: Vec<i32> = seq_ids.clone().map(|i| i as i32).collect();
        let mut indices = None;
        if let Some(e) = entry.as_ref().filter(|e| e.is_valid(&names)) {
            // A damaged cache is rebuilt rather than trusted.
            match load_cached(e, sizes) {
                Ok(ix) => indices = Some(ix),
                Err(err) => tracing::warn!("rebuilding GPTDataset cache: {err:#}"),
            }
        }
        let indices = match indices {
            Some(ix) => ix,
            None => {
                let ix = build_indices(
                    sizes,
                    &ids,
                    params.seq_length,
                    num_samples,
                    params.add_extra_token_to_sequence,
                    drop_last,
                    params.random_seed,
                )
                .with_context(|| {
                    format!("building GPTDataset indices for {prefix} ({})", split.name())
                })?;
                match &entry {
                    Some(e) => {
                        store_cached(e, &ix)?;
                        // Serve from the mapped cache, as later runs do, freeing the heap copy.
                        load_cached(e, sizes).unwrap_or(ix)
                    }
                    None => ix,
                }
            }
        };
        if let Some(n) = num_samples {
            ensure!(n <= indices.num_samples(), "cached index holds fewer samples than {n}");
        }
        Ok(GptDataset {
            low,
            split,
            num_samples,
            params: params.clone(),
            indices: Arc::new(indices),
            description,
        })
    }

    /// Number of samples (all epochs built, ≥ the requested count).
    pub fn len(&self) -> usize {
        self.indices.num_samples()
    }
    /// True when no sample was built.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The split this dataset serves.
    pub fn split(&self) -> Split {
        self.split
    }
    /// The requested sample count (None = one epoch).
    pub fn num_samples(&self) -> Option<usize> {
        self.num_samples
    }
    /// The description JSON that keys the cache.
    pub fn description(&self) -> &str {
        &self.description
    }
    /// The index arrays.
    pub fn indices(&self) -> &GptIndices {
        &self.indices
    }
    /// The underlying sequences.
    pub fn low_level(&self) -> &Arc<dyn LowLevelDataset> {
        &self.low
    }

    /// The raw `seq_length + extra` token window of sample `idx` (padded with `pad_id`).
    pub fn text(&self, idx: usize) -> Result<Vec<i64>> {
        ensure!(idx < self.len(), "sample {idx} out of range: dataset has {} samples", self.len());
        let ix = &self.indices;
        let j = ix.shuffled(idx);
        let [b, ob] = ix.sample(j);
        let [e, oe] = ix.sample(j + 1);
        let extra = self.params.add_extra_token_to_sequence as i64;
        let doc = |p: i64| ix.document_index.get(p as usize) as usize;
        let mut text = Vec::with_capacity(self.params.seq_length + 1);
        if b == e {
            text.extend(self.low.get(doc(b), ob as usize, Some((oe - ob + extra) as usize))?);
        } else {
            for i in b..=e {
                let off = if i > b { 0 } else { ob as usize };
                let len = if i < e { None } else { Some((oe + extra) as usize) };
                text.extend(self.low.get(doc(i), off, len)?);
            }
        }
        let want = self.params.seq_length + extra as usize;
        if text.len() < want {
            text.resize(want, self.params.pad_id);
        }
        Ok(text)
    }

    /// `__getitem__(idx)`.
    pub fn get(&self, idx: usize) -> Result<Sample> {
        let text = self.text(idx)?;
        if let Some(v) = self.params.vocab_size {
            if let Some(t) =
                text.iter().find(|&&t| t != self.params.pad_id && (t < 0 || t >= v as i64))
            {
                bail!(
                    "sample {idx} of {} holds token id {t}, outside the tokenizer vocabulary of {v}; \
                     was the data preprocessed with another tokenizer?",
                    self.low.path_prefix()
                );
            }
        }
        Ok(make_sample(text, &self.params))
    }

    /// `__getitem__(None)`: sample 0 with an all-zero loss mask (pads a last partial batch).
    pub fn padding_sample(&self) -> Result<Sample> {
        let mut s = self.get(0)?;
        s.loss_mask.iter_mut().for_each(|m| *m = 0.0);
        Ok(s)
    }
}

/// Tokens/labels/masks from a raw window, exactly as `GPTDataset.__getitem__`.
pub fn make_sample(text: Vec<i64>, p: &GptDatasetParams) -> Sample {
    let pad = p.pad_id;
    let (mut tokens, mut labels) = if p.add_extra_token_to_sequence {
        (text[..text.len() - 1].to_vec(), text[1..].to_vec())
    } else {
        let mut labels = text[1..].to_vec();
        labels.push(pad);
        (text, labels)
    };
    let (mut loss_mask, position_ids) =
        ltor_loss_mask_and_positions(&tokens, p.eod_id, p.reset_position_ids, p.eod_mask_loss);
    for (m, &l) in loss_mask.iter_mut().zip(&labels) {
        if l == pad {
            *m = 0.0;
        }
    }
    tokens.iter_mut().filter(|t| **t == pad).for_each(|t| *t = 0);
    labels.iter_mut().filter(|t| **t == pad).for_each(|t| *t = 0);
    Sample { tokens, labels, loss_mask, position_ids }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_masks() {
        let (mask, pos) = ltor_loss_mask_and_positions(&[5, 0, 6, 7, 0, 8], 0, true, true);
        assert_eq!(pos, vec![0, 1, 0, 1, 2, 0]);
        assert_eq!(mask, vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
        let am = ltor_attention_mask(&[5, 0, 6], 0, true);
        assert_eq!(am, vec![false, true, true, false, false, true, true, true, false]);
    }
}
