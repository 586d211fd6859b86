//! `BlendedMegatronDatasetBuilder` for GPT: one entry point from params + blend + per-split
//! sample counts to the train/valid/test datasets (gpt-dataset.md §4).
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::blended::{Blend, BlendSpec, BlendedDataset};
use super::gpt_dataset::{GptDataset, GptDatasetParams, LowLevelDataset, Sample};
use super::indexed::IndexedDataset;
use super::mock::MockLowLevelDataset;
use super::split::{normalize, parse_split, split_matrix, split_range, Split};

/// A top-level dataset of one split: a single GPTDataset or a blend of several.
#[derive(Debug, Clone)]
pub enum PretrainDataset {
    /// One prefix (or mock data).
    Gpt(GptDataset),
    /// Several prefixes.
    Blended(BlendedDataset),
}

impl PretrainDataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            PretrainDataset::Gpt(d) => d.len(),
            PretrainDataset::Blended(d) => d.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `idx`.
    pub fn get(&self, idx: usize) -> Result<Sample> {
        match self {
            PretrainDataset::Gpt(d) => d.get(idx),
            PretrainDataset::Blended(d) => Ok(d.get(idx)?.1),
        }
    }
    /// The raw `seq_length + extra` token window of sample `idx` (before label shifting).
    pub fn text(&self, idx: usize) -> Result<Vec<i64>> {
        match self {
            PretrainDataset::Gpt(d) => d.text(idx),
            PretrainDataset::Blended(d) => {
                let (c, s) = d.locate(idx)?;
                d.datasets()[c].text(s)
            }
        }
    }
    /// Sample `idx` with the id of the blended dataset it came from (0 for a single dataset).
    pub fn get_with_source(&self, idx: usize) -> Result<(usize, Sample)> {
        match self {
            PretrainDataset::Gpt(d) => Ok((0, d.get(idx)?)),
            PretrainDataset::Blended(d) => d.get(idx),
        }
    }
    /// `__getitem__(None)`: a sample whose loss mask is all zero (pads a last partial batch).
    pub fn padding_sample(&self) -> Result<Sample> {
        let mut s = self.get(0)?;
        s.loss_mask.iter_mut().for_each(|m| *m = 0.0);
        Ok(s)
    }
}

fn matrix_json(m: &[Option<(f64, f64)>; 3]) -> serde_json::Value {
    serde_json::Value::Array(
        m.iter()
            .map(|b| b.map_or(serde_json::Value::Null, |(a, b)| serde_json::json!([a, b])))
            .collect(),
    )
}

fn open_low(prefix: &str) -> Result<Arc<dyn LowLevelDataset>> {
    Ok(Arc::new(
        IndexedDataset::open(prefix).with_context(|| format!("dataset prefix {prefix:?}"))?,
    ))
}

/// `_build_megatron_dataset_splits`: the per-split GPTDatasets of one low-level dataset.
fn build_splits(
    low: Arc<dyn LowLevelDataset>,
    matrix: &[Option<(f64, f64)>; 3],
    sizes: &[Option<usize>; 3],
    params: &GptDatasetParams,
) -> Result<[Option<GptDataset>; 3]> {
    let n = low.sequence_lengths().len();
    let mut out: [Option<GptDataset>; 3] = [None, None, None];
    for split in Split::ALL {
        let i = split as usize;
        if let Some(bookend) = matrix[i] {
            let range = split_range(bookend, n);
            if range.is_empty() && sizes[i] == Some(0) {
                // Nothing is asked of an empty split (e.g. eval disabled): not an error.
                continue;
            }
            let ds =
                GptDataset::new(low.clone(), range, sizes[i], split, matrix_json(matrix), params)?;
            out[i] = Some(ds);
        }
    }
    Ok(out)
}

fn ceil_target(size: usize, w: f64, surplus: f64) -> usize {
    ((size as f64 * w).ceil() * (1.0 + surplus)).ceil() as usize
}

/// The blended case of one split set: mid-level datasets with buffered sizes, then blends.
fn build_blend(
    blend: &Blend,
    matrix: &[Option<(f64, f64)>; 3],
    sizes: &[Option<usize>; 3],
    params: &GptDatasetParams,
    only: Option<Split>,
) -> Result<[Option<PretrainDataset>; 3]> {
    let weights = blend.weights.as_ref().map(|w| normalize(w)).transpose()?;
    if weights.is_some() {
        for split in Split::ALL {
            let i = split as usize;
            if matrix[i].is_some() && sizes[i].is_none() && only.is_none_or(|o| o == split) {
                bail!("blend weights require a sample count for the {} split", split.name());
            }
        }
    }
    let mut children: [Vec<GptDataset>; 3] = [vec![], vec![], vec![]];
    for (d, prefix) in blend.prefixes.iter().enumerate() {
        let buffer: [Option<usize>; 3] = std::array::from_fn(|i| match (&weights, sizes[i]) {
            (Some(w), Some(s)) => Some(ceil_target(s, w[d], params.mid_level_dataset_surplus)),
            _ => None,
        });
        let built = build_splits(open_low(prefix)?, matrix, &buffer, params)?;
        for (i, ds) in built.into_iter().enumerate() {
            if let Some(ds) = ds {
                children[i].push(ds);
            }
        }
    }
    let mut out: [Option<PretrainDataset>; 3] = [None, None, None];
    for split in Split::ALL {
        let i = split as usize;
        if matrix[i].is_none() || only.is_some_and(|o| o != split) {
            continue;
        }
        let ds = std::mem::take(&mut children[i]);
        if ds.len() != blend.prefixes.len() {
            // Only reachable when a split is empty and asked for zero samples.
            continue;
        }
        let (w, size) = match (&weights, sizes[i]) {
            (Some(w), Some(s)) => {
                (w.clone(), Some(w.iter().map(|&x| ceil_target(s, x, 0.0)).sum()))
            }
            (None, s) => {
                let lens: Vec<f64> = ds.iter().map(|d| d.len() as f64).collect();
                let total = ds.iter().map(|d| d.len()).sum::<usize>();
                (lens, s.map(|s| s.min(total)))
            }
            (Some(_), None) => {
                bail!("blend weights require a sample count for the {} split", split.name())
            }
        };
        let cache = params.path_to_cache.as_deref();
        out[i] = Some(PretrainDataset::Blended(BlendedDataset::new(ds, w, size, cache)?));
    }
    Ok(out)
}

/// `train_valid_test_num_samples` (gpt-dataset.md §3, MLM semantics):
/// `[train_iters·gbs, eval_iters·eval_gbs·(train_iters/eval_interval + 1), eval_iters·eval_gbs]`;
/// `eval_interval` None means evaluation only at the end (one run).
pub fn train_valid_test_num_samples(
    train_iters: usize,
    global_batch_size: usize,
    eval_iters: usize,
    eval_global_batch_size: usize,
    eval_interval: Option<usize>,
) -> [usize; 3] {
    let runs = eval_interval.filter(|&i| i > 0).map_or(1, |i| train_iters / i + 1);
    [
        train_iters * global_batch_size,
        eval_iters * eval_global_batch_size * runs,
        eval_iters * eval_global_batch_size,
    ]
}

/// Build train/valid/test datasets as megatron-core's builder does.
///
/// `split_sample_counts[i]` is the number of samples split i must serve (Megatron's
/// `train_valid_test_num_samples`); None builds exactly one epoch. A split whose range is empty
/// in `params.split` is returned as None.
pub fn build_gpt_datasets(
    params: &GptDatasetParams,
    blend: &BlendSpec,
    split_sample_counts: [Option<usize>; 3],
) -> Result<[Option<PretrainDataset>; 3]> {
    let wrap = |a: [Option<GptDataset>; 3]| a.map(|d| d.map(PretrainDataset::Gpt));
    match blend {
        BlendSpec::Mock => {
            let vocab = params.vocab_size.context("mock data needs the tokenizer vocab size")?;
            let low: Arc<dyn LowLevelDataset> =
                Arc::new(MockLowLevelDataset::new(vocab, params.eod_id)?);
            let matrix = split_matrix(&parse_split("1,1,1")?);
            Ok(wrap(build_splits(low, &matrix, &split_sample_counts, params)?))
        }
        BlendSpec::Blend(b) => {
            let split =
                params.split.as_deref().context("dataset.split is required with a blend")?;
            let matrix = split_matrix(&parse_split(split)?);
            if b.prefixes.len() == 1 && b.weights.is_none() {
                return Ok(wrap(build_splits(
                    open_low(&b.prefixes[0])?,
                    &matrix,
                    &split_sample_counts,
                    params,
                )?));
            }
            build_blend(b, &matrix, &split_sample_counts, params, None)
        }
        BlendSpec::PerSplit(blends) => {
            let mut out: [Option<PretrainDataset>; 3] = [None, None, None];
            for split in Split::ALL {
                let i = split as usize;
                let Some(b) = &blends[i] else { continue };
                let mut matrix = [None; 3];
                matrix[i] = Some((0.0, 1.0));
                let mut sizes = [Some(0); 3];
                sizes[i] = split_sample_counts[i];
                if b.prefixes.len() == 1 {
                    let mut built =
                        build_splits(open_low(&b.prefixes[0])?, &matrix, &sizes, params)?;
                    out[i] = built[i].take().map(PretrainDataset::Gpt);
                } else {
                    let mut built = build_blend(b, &matrix, &sizes, params, Some(split))?;
                    out[i] = built[i].take();
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_counts() {
        assert_eq!(train_valid_test_num_samples(100, 8, 5, 4, Some(50)), [800, 60, 20]);
        assert_eq!(train_valid_test_num_samples(100, 8, 0, 4, Some(50)), [800, 0, 0]);
        assert_eq!(train_valid_test_num_samples(100, 8, 2, 4, None), [800, 8, 8]);
    }
}
