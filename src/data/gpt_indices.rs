//! GPTDataset index arrays: `_build_document_sample_shuffle_indices` and `build_sample_idx`
//! (gpt-dataset.md §5–6), and their `.npy` cache form.
use anyhow::{bail, ensure, Result};

use super::cache::{npy_bytes, CacheEntry, IndexVec, NpyDtype};
use super::numpy_rng::RandomState;

/// The three index arrays of a GPTDataset, kept in megatron-core's narrow dtypes (int32
/// sample index and uint32 shuffle index unless the data is too large) to halve memory.
#[derive(Debug, Clone, PartialEq)]
pub struct GptIndices {
    /// Document (sequence) ids in epoch order (int32).
    pub document_index: IndexVec,
    /// `[m+1, 2]` row-major pairs (position in document_index, token offset).
    pub sample_index: IndexVec,
    /// Permutation of `0..m`.
    pub shuffle_index: IndexVec,
}

impl GptIndices {
    /// Number of samples `m`.
    pub fn num_samples(&self) -> usize {
        self.shuffle_index.len()
    }
    /// Row `j` of the sample index.
    pub fn sample(&self, j: usize) -> [i64; 2] {
        [self.sample_index.get(2 * j), self.sample_index.get(2 * j + 1)]
    }
    /// The sample-index row shuffled to position `k`.
    pub fn shuffled(&self, k: usize) -> usize {
        self.shuffle_index.get(k) as usize
    }
}

fn shuffled_range(rng: &mut RandomState, lo: i64, hi: i64, wide: bool) -> IndexVec {
    if wide {
        let mut v: Vec<i64> = (lo..hi).collect();
        rng.shuffle(&mut v);
        IndexVec::I64(v)
    } else {
        let mut v: Vec<u32> = (lo as u32..hi as u32).collect();
        rng.shuffle(&mut v);
        IndexVec::U32(v)
    }
}

/// `_build_document_sample_shuffle_indices` for sequence `sizes`, the split's sequence ids
/// `indices`, `num_samples` (None = one epoch).
pub fn build_indices(
    sizes: &[i32],
    indices: &[i32],
    seq_length: usize,
    num_samples: Option<usize>,
    add_extra_token: bool,
    drop_last: bool,
    seed: u32,
) -> Result<GptIndices> {
    let extra = add_extra_token as i64;
    let l = seq_length as i64;
    ensure!(seq_length > 0, "seq_length must be positive");
    let t: i64 = indices.iter().map(|&i| sizes[i as usize] as i64).sum();
    ensure!(t > extra, "the split holds {t} tokens, too few for one sample");
    let mut epochs: i64 = 1;
    if let Some(n) = num_samples {
        let requested = n as i64 * l + extra;
        let mut tok = t;
        while tok < requested {
            tok += t;
            epochs += 1;
        }
    }
    let (separate, n_sans) = if epochs == 1 {
        (false, 0)
    } else {
        let n = num_samples.expect("several epochs imply num_samples") as i64;
        let n_sans = ((epochs - 1) * t - extra) / l;
        let n_final = n - n_sans;
        let n_per_epoch = (t - extra) / l;
        ensure!(n_final >= 0 && n_final <= n_per_epoch + 1, "epoch arithmetic failed");
        (n_final < (0.80 * n_per_epoch as f64) as i64, n_sans)
    };
    let mut rng = RandomState::new(seed);
    let tile = |e: i64, rng: &mut RandomState| {
        let mut v: Vec<i32> = Vec::with_capacity(indices.len() * e as usize);
        for _ in 0..e {
            v.extend_from_slice(indices);
        }
        rng.shuffle(&mut v);
        v
    };
    let document_index = if separate {
        let mut first = tile(epochs - 1, &mut rng);
        first.extend(tile(1, &mut rng));
        first
    } else {
        tile(epochs, &mut rng)
    };
    let wide = document_index.len() as i64 > i32::MAX as i64
        || sizes.iter().any(|&x| x as i64 > i32::MAX as i64);
    let sample_index =
        build_sample_idx(sizes, &document_index, l, epochs, t, drop_last, extra, wide);
    let m = sample_index.len() as i64 / 2 - 1;
    let wide_shuffle = m >= u32::MAX as i64 - 1;
    let shuffle_index = if separate {
        let a = shuffled_range(&mut rng, 0, n_sans, wide_shuffle);
        let b = shuffled_range(&mut rng, n_sans, m, wide_shuffle);
        match (a, b) {
            (IndexVec::U32(mut a), IndexVec::U32(b)) => {
                a.extend(b);
                IndexVec::U32(a)
            }
            (a, b) => IndexVec::I64(a.to_i64().into_iter().chain(b.to_i64()).collect()),
        }
    } else {
        shuffled_range(&mut rng, 0, m, wide_shuffle)
    };
    if let Some(n) = num_samples {
        ensure!(n as i64 <= m, "built {m} samples but {n} were requested");
    }
    Ok(GptIndices { document_index: IndexVec::I32(document_index), sample_index, shuffle_index })
}

/// `helpers.cpp::build_sample_idx`, flattened `[m+1, 2]`, int32 unless `wide`.
#[allow(clippy::too_many_arguments)]
fn build_sample_idx(
    sizes: &[i32],
    doc_idx: &[i32],
    l: i64,
    epochs: i64,
    t: i64,
    drop_last: bool,
    extra: i64,
    wide: bool,
) -> IndexVec {
    let m = if drop_last {
        (epochs * t - extra) / l
    } else {
        // C++ computes this in single precision.
        ((epochs * t - extra) as f32 / l as f32).ceil() as i64
    };
    let dtype = if wide { NpyDtype::I64 } else { NpyDtype::I32 };
    let mut out = IndexVec::with_capacity(dtype, 2 * (m as usize + 1));
    out.push(0);
    out.push(0);
    let (mut di, mut off) = (0usize, 0i64);
    for _ in 1..=m {
        let mut rem = l + extra;
        while rem != 0 {
            let dlen = sizes[doc_idx[di] as usize] as i64 - off;
            rem -= dlen;
            if rem <= 0 {
                off += rem + dlen - extra;
                rem = 0;
            } else {
                if di == doc_idx.len() - 1 {
                    off = sizes[doc_idx[di] as usize] as i64 - extra;
                    break;
                }
                di += 1;
                off = 0;
            }
        }
        out.push(di as i64);
        out.push(off);
    }
    out
}

/// Write the three arrays of a GPTDataset cache entry (dtypes as megatron-core picks them).
pub(crate) fn store_cached(e: &CacheEntry, ix: &GptIndices) -> Result<()> {
    e.store(&[
        ("document_index", npy_bytes(&ix.document_index, &[ix.document_index.len()])),
        ("sample_index", npy_bytes(&ix.sample_index, &[ix.sample_index.len() / 2, 2])),
        ("shuffle_index", npy_bytes(&ix.shuffle_index, &[ix.shuffle_index.len()])),
    ])
}

/// Memory-map and sanity-check a cached entry; any inconsistency is an error (the caller
/// rebuilds). The checks are linear scans, cheap next to one epoch of training.
pub(crate) fn load_cached(e: &CacheEntry, sizes: &[i32]) -> Result<GptIndices> {
    let (document_index, _) = e.load_mapped("document_index")?;
    let (sample_index, shape) = e.load_mapped("sample_index")?;
    let (shuffle_index, _) = e.load_mapped("shuffle_index")?;
    ensure!(shape.len() == 2 && shape[1] == 2 && shape[0] >= 1, "sample_index has shape {shape:?}");
    ensure!(document_index.dtype() == NpyDtype::I32, "document_index is not int32");
    let n_docs = document_index.len();
    if (0..n_docs).any(|k| {
        let d = document_index.get(k);
        d < 0 || d as usize >= sizes.len()
    }) {
        bail!("document_index refers to missing sequences");
    }
    let ix = GptIndices { document_index, sample_index, shuffle_index };
    let rows = shape[0];
    if (0..rows).any(|j| {
        let [d, o] = ix.sample(j);
        d < 0 || d as usize >= n_docs.max(1) || o < 0
    }) {
        bail!("sample_index out of range");
    }
    let m = rows as i64 - 1;
    let sh = &ix.shuffle_index;
    if sh.len() as i64 != m || (0..sh.len()).any(|k| sh.get(k) < 0 || sh.get(k) >= m) {
        bail!("shuffle_index inconsistent with sample_index");
    }
    Ok(ix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_worked_example() {
        let sizes = [5, 3, 7, 4, 6];
        let ix = build_indices(&sizes, &[0, 1, 2, 3, 4], 4, Some(8), true, true, 1234).unwrap();
        assert_eq!(ix.document_index, IndexVec::I32(vec![4, 0, 1, 2, 3, 3, 2, 1, 0, 4]));
        let want: Vec<[i64; 2]> = vec![
            [0, 0],
            [0, 4],
            [1, 2],
            [2, 1],
            [3, 2],
            [3, 6],
            [4, 3],
            [5, 3],
            [6, 3],
            [7, 0],
            [8, 1],
            [9, 0],
            [9, 4],
        ];
        let rows: Vec<[i64; 2]> = (0..13).map(|j| ix.sample(j)).collect();
        assert_eq!(rows, want);
        assert_eq!(ix.shuffle_index, IndexVec::U32(vec![0, 4, 3, 2, 5, 1, 7, 6, 9, 8, 11, 10]));
        assert_eq!(ix.sample_index.dtype(), NpyDtype::I32);
    }
}
