//! Blends: parsing of `data_path`/`blend` lists and megatron-core's `BlendedDataset`
//! (gpt-dataset.md §1, §9).
use anyhow::{bail, ensure, Context, Result};

use super::cache::{describe, npy_bytes, CacheEntry, IndexVec, NpyDtype};
use super::gpt_dataset::{GptDataset, Sample};
use super::split::normalize;

/// Prefixes with optional (unnormalized) weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Blend {
    /// Dataset path prefixes (no `.bin`/`.idx`).
    pub prefixes: Vec<String>,
    /// One weight per prefix, or None (each dataset used for exactly one epoch).
    pub weights: Option<Vec<f64>>,
}

/// Where the pretraining data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum BlendSpec {
    /// No data given: megatron-core's MockGPTDataset.
    Mock,
    /// `dataset.blend` / `data_path`, divided by `dataset.split`.
    Blend(Blend),
    /// `dataset.blend_per_split`: train, valid, test blends (each used whole).
    PerSplit([Option<Blend>; 3]),
}

/// `get_blend_from_list` for string lists: odd length ⇒ all prefixes; even length ⇒
/// `(weight, prefix)` pairs unless some weight does not parse, in which case all are prefixes.
pub fn get_blend_from_list(list: &[String]) -> Result<Blend> {
    ensure!(!list.is_empty(), "empty blend: give at least one dataset prefix");
    let all_prefixes =
        || Blend { prefixes: list.iter().map(|s| s.trim().to_string()).collect(), weights: None };
    if list.len() % 2 == 1 {
        return Ok(all_prefixes());
    }
    let mut weights = Vec::new();
    let mut prefixes = Vec::new();
    for pair in list.chunks(2) {
        match pair[0].trim().parse::<f64>() {
            Ok(w) => weights.push(w),
            Err(_) => return Ok(all_prefixes()),
        }
        prefixes.push(pair[1].trim().to_string());
    }
    check_weights(&weights, &prefixes)?;
    Ok(Blend { prefixes, weights: Some(weights) })
}

fn check_weights(w: &[f64], prefixes: &[String]) -> Result<()> {
    for (x, p) in w.iter().zip(prefixes) {
        ensure!(x.is_finite() && *x > 0.0, "blend weight {x} for {p:?} must be a positive number");
    }
    Ok(())
}

/// Parse a blend given as JSON/TOML-like values: `["a"]`, `["a", "b"]`, `[0.3, "a", 0.7, "b"]`
/// or `["30", "a", "70", "b"]`. A list with numeric entries must be strict weight/prefix pairs.
pub fn parse_blend(items: &[serde_json::Value]) -> Result<Blend> {
    use serde_json::Value;
    if items.iter().any(|v| v.is_number()) {
        ensure!(
            items.len().is_multiple_of(2),
            "blend {items:?} has odd length {}: expected [weight, prefix, weight, prefix, ...]",
            items.len()
        );
        let mut weights = Vec::new();
        let mut prefixes = Vec::new();
        for (k, pair) in items.chunks(2).enumerate() {
            let w = match &pair[0] {
                Value::Number(n) => n.as_f64().context("weight not representable")?,
                Value::String(s) => s.trim().parse::<f64>().with_context(|| {
                    format!("blend entry {}: weight {s:?} is not a number", 2 * k)
                })?,
                v => bail!("blend entry {}: expected a weight, got {v}", 2 * k),
            };
            let Value::String(p) = &pair[1] else {
                bail!(
                    "blend entry {}: expected a dataset prefix string, got {}",
                    2 * k + 1,
                    pair[1]
                )
            };
            weights.push(w);
            prefixes.push(p.trim().to_string());
        }
        check_weights(&weights, &prefixes)?;
        return Ok(Blend { prefixes, weights: Some(weights) });
    }
    let strs: Vec<String> = items
        .iter()
        .enumerate()
        .map(|(k, v)| match v {
            Value::String(s) => Ok(s.clone()),
            v => bail!("blend entry {k}: expected a string or number, got {v}"),
        })
        .collect::<Result<_>>()?;
    get_blend_from_list(&strs)
}

/// `--data-path`-style string: whitespace-separated `[weight] prefix` list.
pub fn parse_blend_str(s: &str) -> Result<Blend> {
    let items: Vec<String> = s.split_whitespace().map(str::to_string).collect();
    get_blend_from_list(&items)
}

impl BlendSpec {
    /// From the config fields: `blend` (a list like `[0.3, "a", 0.7, "b"]`) or
    /// `blend_per_split` (three optional lists); neither ⇒ mock data; both ⇒ error.
    pub fn from_config(
        blend: Option<&[serde_json::Value]>,
        blend_per_split: Option<&[Option<Vec<serde_json::Value>>]>,
    ) -> Result<BlendSpec> {
        let per_split = blend_per_split.filter(|b| b.iter().any(Option::is_some));
        match (blend, per_split) {
            (Some(_), Some(_)) => {
                bail!("dataset.blend and dataset.blend_per_split are mutually exclusive")
            }
            (Some(b), None) => Ok(BlendSpec::Blend(parse_blend(b)?)),
            (None, Some(ps)) => {
                ensure!(
                    ps.len() == 3,
                    "dataset.blend_per_split needs 3 entries (train, valid, test), got {}",
                    ps.len()
                );
                let mut out: [Option<Blend>; 3] = [None, None, None];
                for (i, b) in ps.iter().enumerate() {
                    if let Some(b) = b {
                        out[i] = Some(
                            parse_blend(b)
                                .with_context(|| format!("dataset.blend_per_split[{i}]"))?,
                        );
                    }
                }
                Ok(BlendSpec::PerSplit(out))
            }
            (None, None) => Ok(BlendSpec::Mock),
        }
    }
}

/// `helpers.cpp::build_blending_indices`: greedy error-minimising schedule of `size` samples.
pub fn build_blending_indices(weights: &[f64], size: usize) -> (Vec<i16>, Vec<i64>) {
    let mut cur = vec![0i64; weights.len()];
    let mut di = Vec::with_capacity(size);
    let mut dsi = Vec::with_capacity(size);
    for s in 0..size {
        let x = (s as f64).max(1.0);
        let mut best = 0usize;
        let mut best_err = weights[0] * x - cur[0] as f64;
        for d in 1..weights.len() {
            let err = weights[d] * x - cur[d] as f64;
            if err > best_err {
                best = d;
                best_err = err;
            }
        }
        di.push(best as i16);
        dsi.push(cur[best]);
        cur[best] += 1;
    }
    (di, dsi)
}

/// `build_exhaustive_blending_indices`: every sample of every dataset exactly once.
pub fn build_exhaustive_blending_indices(lengths: &[usize]) -> (Vec<i16>, Vec<i64>) {
    let total: usize = lengths.iter().sum();
    let w: Vec<f64> = lengths.iter().map(|&l| l as f64 / total as f64).collect();
    let mut cur = vec![0i64; lengths.len()];
    let mut di = Vec::with_capacity(total);
    let mut dsi = Vec::with_capacity(total);
    // As helpers.cpp: the best error starts at 0.0 and only a strictly larger error moves the
    // choice, so when every unspent error is <= 0 the previous dataset is taken again.
    let mut best = 0usize;
    for s in 0..total {
        let x = (s as f64).max(1.0);
        let mut best_err = 0.0f64;
        for d in 0..lengths.len() {
            if cur[d] as usize >= lengths[d] {
                continue;
            }
            let err = w[d] * x - cur[d] as f64;
            if err > best_err {
                best = d;
                best_err = err;
            }
        }
        di.push(best as i16);
        dsi.push(cur[best]);
        cur[best] += 1;
    }
    (di, dsi)
}

/// megatron-core `BlendedDataset` over GPTDatasets of one split.
#[derive(Debug, Clone)]
pub struct BlendedDataset {
    datasets: Vec<GptDataset>,
    weights: Vec<f64>,
    dataset_index: IndexVec,
    dataset_sample_index: IndexVec,
}

impl BlendedDataset {
    /// Build the blend; `size` None ⇒ exhaustive (weights must be the dataset lengths).
    /// Indices are cached under `cache_dir` when given.
    pub fn new(
        datasets: Vec<GptDataset>,
        weights: Vec<f64>,
        size: Option<usize>,
        cache_dir: Option<&std::path::Path>,
    ) -> Result<Self> {
        ensure!(!datasets.is_empty(), "a blend needs at least one dataset");
        ensure!(datasets.len() < 32767, "at most 32766 datasets can be blended");
        ensure!(
            weights.len() == datasets.len(),
            "{} weights for {} datasets",
            weights.len(),
            datasets.len()
        );
        ensure!(weights.iter().all(|w| *w > 0.0), "blend weights must be positive: {weights:?}");
        let split = datasets[0].split();
        ensure!(
            datasets.iter().all(|d| d.split() == split),
            "blended datasets have different splits"
        );
        let weights = if size.is_some() { normalize(&weights)? } else { weights };
        let children: Vec<serde_json::Value> = datasets
            .iter()
            .map(|d| serde_json::from_str(d.description()).unwrap_or(serde_json::Value::Null))
            .collect();
        let desc = describe(&serde_json::json!({
            "class": "BlendedDataset",
            "datasets": children,
            "split": split.name(),
            "weights": weights,
            "size": size,
            "producer": "mbridge",
        }));
        let entry = cache_dir.map(|d| CacheEntry::new(d, "BlendedDataset", split.name(), desc));
        let names = ["dataset_index", "dataset_sample_index"];
        let load = |e: &CacheEntry| -> Option<(IndexVec, IndexVec)> {
            let (a, _) = e.load_mapped("dataset_index").ok()?;
            let (b, _) = e.load_mapped("dataset_sample_index").ok()?;
            let ok = a.dtype() == NpyDtype::I16 && b.dtype() == NpyDtype::I64 && a.len() == b.len();
            ok.then_some((a, b))
        };
        let cached = entry.as_ref().filter(|e| e.is_valid(&names)).and_then(load);
        let (dataset_index, dataset_sample_index) = match cached {
            Some(c) => c,
            None => {
                let built = match size {
                    Some(n) => build_blending_indices(&weights, n),
                    None => {
                        let lens: Vec<usize> = weights.iter().map(|w| *w as usize).collect();
                        build_exhaustive_blending_indices(&lens)
                    }
                };
                let (a, b) = (IndexVec::I16(built.0), IndexVec::I64(built.1));
                match &entry {
                    Some(e) => {
                        e.store(&[
                            ("dataset_index", npy_bytes(&a, &[a.len()])),
                            ("dataset_sample_index", npy_bytes(&b, &[b.len()])),
                        ])?;
                        // Serve from the mapped cache, freeing the heap copy.
                        load(e).unwrap_or((a, b))
                    }
                    None => (a, b),
                }
            }
        };
        // Every child must hold the samples the schedule asks of it (a damaged cache fails
        // here too, naming the dataset).
        let mut need = vec![0i64; datasets.len()];
        for k in 0..dataset_index.len() {
            let (d, s) = (dataset_index.get(k), dataset_sample_index.get(k));
            ensure!(d >= 0 && (d as usize) < datasets.len(), "blend index refers to dataset {d}");
            need[d as usize] = need[d as usize].max(s + 1);
        }
        for (d, ds) in datasets.iter().enumerate() {
            ensure!(
                need[d] as usize <= ds.len(),
                "blended dataset {} ({}) needs {} samples but has {}; increase dataset.mid_level_dataset_surplus",
                d,
                ds.low_level().path_prefix(),
                need[d],
                ds.len()
            );
        }
        Ok(BlendedDataset { datasets, weights, dataset_index, dataset_sample_index })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.dataset_index.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.dataset_index.is_empty()
    }
    /// The (normalized) weights.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }
    /// The child datasets.
    pub fn datasets(&self) -> &[GptDataset] {
        &self.datasets
    }
    /// `(dataset_index, dataset_sample_index)` arrays (int16, int64).
    pub fn blending_indices(&self) -> (&IndexVec, &IndexVec) {
        (&self.dataset_index, &self.dataset_sample_index)
    }
    /// Which child and which of its samples serve blended sample `idx`.
    pub fn locate(&self, idx: usize) -> Result<(usize, usize)> {
        ensure!(idx < self.len(), "sample {idx} out of range: blend has {} samples", self.len());
        Ok((self.dataset_index.get(idx) as usize, self.dataset_sample_index.get(idx) as usize))
    }
    /// Sample `idx` and the id of the dataset it came from.
    pub fn get(&self, idx: usize) -> Result<(usize, Sample)> {
        let (d, s) = self.locate(idx)?;
        Ok((d, self.datasets[d].get(s)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_blending_vectors() {
        let (a, b) = build_blending_indices(&[0.3, 0.7], 10);
        assert_eq!(a, vec![1, 0, 1, 1, 0, 1, 1, 0, 1, 1]);
        assert_eq!(b, vec![0, 0, 1, 2, 1, 3, 4, 2, 5, 6]);
        let w = normalize(&[30.0, 50.0, 20.0]).unwrap();
        let (a, b) = build_blending_indices(&w, 10);
        assert_eq!(a, vec![1, 0, 2, 1, 0, 1, 2, 1, 0, 1]);
        assert_eq!(b, vec![0, 0, 0, 1, 1, 2, 1, 3, 2, 4]);
        let (a, _) = build_exhaustive_blending_indices(&[2, 3]);
        assert_eq!(a.iter().filter(|&&d| d == 0).count(), 2);
        assert_eq!(a.len(), 5);
        // Tie at s=2 keeps the previous choice, as helpers.cpp does.
        assert_eq!(build_exhaustive_blending_indices(&[2, 2]).0, vec![0, 1, 1, 0]);
    }

    #[test]
    fn blend_lists() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let b = get_blend_from_list(&s(&["30", "a", "70", " b "])).unwrap();
        assert_eq!(b, Blend { prefixes: s(&["a", "b"]), weights: Some(vec![30.0, 70.0]) });
        assert_eq!(get_blend_from_list(&s(&["a", "b"])).unwrap().weights, None);
        let j: Vec<serde_json::Value> = serde_json::from_str(r#"[0.3, "a", 0.7, "b"]"#).unwrap();
        assert_eq!(parse_blend(&j).unwrap().weights, Some(vec![0.3, 0.7]));
        assert_eq!(parse_blend_str("0.3 a 0.7 b").unwrap().prefixes, s(&["a", "b"]));
        assert_eq!(BlendSpec::from_config(None, None).unwrap(), BlendSpec::Mock);
        assert!(BlendSpec::from_config(Some(&j), Some(&[Some(j.clone()), None, None])).is_err());
        let ps = BlendSpec::from_config(None, Some(&[Some(j.clone()), None, None])).unwrap();
        assert!(matches!(ps, BlendSpec::PerSplit([Some(_), None, None])));
        let bad: Vec<serde_json::Value> = serde_json::from_str(r#"[0.3, "a", 0.7]"#).unwrap();
        assert!(parse_blend(&bad).unwrap_err().to_string().contains("odd length"));
        let neg: Vec<serde_json::Value> = serde_json::from_str(r#"[-0.3, "a", 0.7, "b"]"#).unwrap();
        assert!(parse_blend(&neg).is_err());
        assert!(get_blend_from_list(&s(&["-1", "a", "2", "b"])).is_err());
    }
}
