//! Offline sequence packing (`prepare_gpt_sft_packed_data`, spec §6): histogram by length,
//! `first_fit_shuffle` / `first_fit_decreasing` bin assignment under NumPy's legacy global
//! RandomState seeded with the dataset seed, then `fill_packing_strategy` (per-length
//! permutations, bins filled by popping from the end of each length's list).
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use super::SftExample;
use crate::data::numpy_rng::RandomState;

/// How lengths are assigned to bins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackingAlgorithm {
    /// Shuffle the lengths (`np.random.shuffle`), then first fit. Megatron Bridge's default.
    FirstFitShuffle,
    /// Sort the lengths descending, then first fit.
    FirstFitDecreasing,
}

/// One packed bin as stored on disk: concatenated rows, the shifted loss mask and the start
/// offset of every sub-sequence (first 0, strictly increasing, total length not included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedBin {
    /// Concatenated `input_ids` of the bin's rows.
    pub input_ids: Vec<i64>,
    /// Concatenated loss masks, each row's shifted left by one (`mask[1:] + [0]`).
    pub loss_mask: Vec<u8>,
    /// Start offset of each row in `input_ids`.
    pub seq_start_id: Vec<usize>,
}

/// One entry of `<P>_metadata.jsonl` (a JSON list: train first, then validation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackingMetadata {
    /// Longest `seq_len` (= tokens − 1) of the split.
    pub dataset_max_seqlen: usize,
    /// Most rows in one bin.
    pub max_samples_per_bin: usize,
    /// `round(n_rows / n_bins, 2)`.
    pub packing_factor: f64,
    /// `round(Σ bin sums / n_bins / P · 100, 2)`.
    pub packing_efficiency: f64,
    /// P.
    pub pack_size: usize,
    /// Smallest Σ seq_len of a bin.
    pub min_packed_seqlen: usize,
}

/// Python's `round(x, 2)` (correctly rounded from the binary value).
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(x)
}

/// Leftmost bin with remaining capacity ≥ s, in O(log n): a max segment tree over remaining
/// capacities (unopened bins hold -1 so they are never chosen).
struct FirstFit {
    size: usize,
    tree: Vec<i64>,
}

impl FirstFit {
    fn new(n: usize) -> Self {
        let size = n.max(1).next_power_of_two();
        FirstFit { size, tree: vec![-1; 2 * size] }
    }
    fn set(&mut self, bin: usize, rem: i64) {
        let mut i = bin + self.size;
        self.tree[i] = rem;
        while i > 1 {
            i /= 2;
            self.tree[i] = self.tree[2 * i].max(self.tree[2 * i + 1]);
        }
    }
    fn find(&self, s: i64) -> Option<usize> {
        if self.tree[1] < s {
            return None;
        }
        let mut i = 1;
        while i < self.size {
            i = if self.tree[2 * i] >= s { 2 * i } else { 2 * i + 1 };
        }
        Some(i - self.size)
    }
}

/// First fit: each length goes to the lowest-index bin with room (Σ ≤ `pack_size`), else to a
/// new bin. Returns the lengths of every bin in insertion order.
pub fn first_fit(seqlens: &[usize], pack_size: usize) -> Vec<Vec<usize>> {
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut tree = FirstFit::new(seqlens.len());
    let mut rem: Vec<i64> = Vec::new();
    for &s in seqlens {
        match tree.find(s as i64) {
            Some(b) => {
                bins[b].push(s);
                rem[b] -= s as i64;
                tree.set(b, rem[b]);
            }
            None => {
                bins.push(vec![s]);
                rem.push(pack_size as i64 - s as i64);
                tree.set(bins.len() - 1, *rem.last().expect("just pushed"));
            }
        }
    }
    bins
}

/// `create_packing_strategy`: lengths from the histogram (ascending), assigned by `algo`
/// (drawing from `rng` for the shuffle), plus the metadata of the result.
pub fn create_packing_strategy(
    histogram: &[usize],
    pack_size: usize,
    algo: PackingAlgorithm,
    rng: &mut RandomState,
) -> Result<(Vec<Vec<usize>>, PackingMetadata)> {
    let mut lens: Vec<usize> =
        histogram.iter().enumerate().flat_map(|(l, &c)| std::iter::repeat_n(l, c)).collect();
    ensure!(!lens.is_empty(), "nothing to pack: every row was skipped or the split is empty");
    let n = lens.len();
    let max = *lens.last().expect("non-empty");
    match algo {
        PackingAlgorithm::FirstFitShuffle => rng.shuffle(&mut lens),
        PackingAlgorithm::FirstFitDecreasing => lens.sort_unstable_by(|a, b| b.cmp(a)),
    }
    let bins = first_fit(&lens, pack_size);
    let sums: Vec<usize> = bins.iter().map(|b| b.iter().sum()).collect();
    let meta = PackingMetadata {
        dataset_max_seqlen: max,
        max_samples_per_bin: bins.iter().map(Vec::len).max().unwrap_or(0),
        packing_factor: round2(n as f64 / bins.len() as f64),
        packing_efficiency: round2(
            sums.iter().sum::<usize>() as f64 / sums.len() as f64 / pack_size as f64 * 100.0,
        ),
        pack_size,
        min_packed_seqlen: sums.iter().copied().min().unwrap_or(0),
    };
    Ok((bins, meta))
}

/// `fill_packing_strategy`: `sequences[len]` holds the rows of `seq_len` = len in dataset
/// order. Per length (ascending) the rows are permuted with `rng.permutation`; then every bin
/// pops its rows from the end of each length's list.
pub fn fill_packing_strategy(
    assignments: &[Vec<usize>],
    mut sequences: Vec<Vec<SftExample>>,
    rng: &mut RandomState,
) -> Result<Vec<PackedBin>> {
    for rows in sequences.iter_mut().filter(|r| !r.is_empty()) {
        let perm = rng.permutation(rows.len());
        let mut taken: Vec<Option<SftExample>> =
            std::mem::take(rows).into_iter().map(Some).collect();
        *rows = perm.iter().map(|&p| taken[p as usize].take().expect("a permutation")).collect();
        for r in rows.iter_mut() {
            // Align with next-token labels: train on the output after the last context token.
            r.loss_mask.remove(0);
            r.loss_mask.push(0);
        }
    }
    let mut out = Vec::with_capacity(assignments.len());
    for bin in assignments {
        let mut b =
            PackedBin { input_ids: Vec::new(), loss_mask: Vec::new(), seq_start_id: Vec::new() };
        for &len in bin {
            let Some(row) = sequences.get_mut(len).and_then(Vec::pop) else {
                bail!("packing strategy asks for more rows of length {len} than exist");
            };
            b.seq_start_id.push(b.input_ids.len());
            b.input_ids.extend(row.input_ids);
            b.loss_mask.extend(row.loss_mask);
        }
        out.push(b);
    }
    ensure!(sequences.iter().all(Vec::is_empty), "rows left over after filling the bins");
    Ok(out)
}

/// Parameters of [`pack_examples`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackParams {
    /// P: Σ seq_len capacity of a bin.
    pub pack_size: usize,
    /// Rows with `seq_len` above this are skipped (≤ P).
    pub max_seq_len: usize,
    /// Pre-pad every row's `seq_len` to a multiple of this (1 = off).
    pub pad_seq_to_mult: usize,
    /// Pad id for pre-padding (the EOD id).
    pub pad_id: i64,
    /// `np.random.seed(seed)` before assignment.
    pub seed: u32,
    /// Assignment algorithm.
    pub algorithm: PackingAlgorithm,
}

/// Pack tokenized rows of one split: pre-pad, histogram (skipping rows longer than
/// `max_seq_len` with a warning), assign, fill. Returns the bins and their metadata.
pub fn pack_examples(
    examples: &[SftExample],
    p: &PackParams,
) -> Result<(Vec<PackedBin>, PackingMetadata)> {
    ensure!(p.pack_size > 0, "pack size must be positive");
    ensure!(
        p.max_seq_len <= p.pack_size,
        "max_single_sequence_length {} exceeds the pack size {}",
        p.max_seq_len,
        p.pack_size
    );
    let k = p.pad_seq_to_mult.max(1);
    let mut sequences: Vec<Vec<SftExample>> = vec![Vec::new(); p.max_seq_len + 1];
    let mut skipped = 0usize;
    for ex in examples {
        let mut ex = ex.clone();
        ensure!(!ex.input_ids.is_empty(), "an empty row cannot be packed");
        if k > 1 {
            let r = ex.input_ids.len() - 1;
            let padded = r.div_ceil(k) * k;
            let cap = p.max_seq_len / k * k;
            let target = padded.min(cap);
            if target > r {
                ex.input_ids.resize(target + 1, p.pad_id);
                ex.loss_mask.resize(target + 1, 0);
            }
        }
        let seq_len = ex.input_ids.len() - 1;
        if seq_len > p.max_seq_len {
            skipped += 1;
            continue;
        }
        sequences[seq_len].push(ex);
    }
    if skipped > 0 {
        tracing::warn!(
            "packing: skipped {skipped} row(s) longer than {} tokens (max_single_sequence_length)",
            p.max_seq_len
        );
    }
    let histogram: Vec<usize> = sequences.iter().map(Vec::len).collect();
    let mut rng = RandomState::new(p.seed);
    let (assignments, meta) =
        create_packing_strategy(&histogram, p.pack_size, p.algorithm, &mut rng)?;
    let bins = fill_packing_strategy(&assignments, sequences, &mut rng)?;
    Ok((bins, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        assert_eq!(first_fit(&[5, 3, 2], 8), vec![vec![5, 3], vec![2]]);
        assert_eq!(first_fit(&[3, 2, 5], 8), vec![vec![3, 2], vec![5]]);
        let mut hist = vec![0; 9];
        for l in [2, 3, 5] {
            hist[l] += 1;
        }
        let mut rng = RandomState::new(1234);
        let (bins, meta) =
            create_packing_strategy(&hist, 8, PackingAlgorithm::FirstFitShuffle, &mut rng).unwrap();
        assert_eq!(bins, vec![vec![2, 3], vec![5]]);
        assert_eq!(meta.max_samples_per_bin, 2);
        assert_eq!(meta.packing_factor, 1.5);
        assert_eq!(meta.packing_efficiency, 62.5);
        assert_eq!(meta.min_packed_seqlen, 5);
        assert_eq!(meta.dataset_max_seqlen, 5);
    }

    #[test]
    fn first_fit_matches_quadratic_scan() {
        let mut rng = RandomState::new(7);
        let lens: Vec<usize> = (0..500).map(|_| rng.random_interval(63) as usize + 1).collect();
        let mut naive: Vec<Vec<usize>> = Vec::new();
        for &s in &lens {
            match naive.iter().position(|b| b.iter().sum::<usize>() + s <= 64) {
                Some(i) => naive[i].push(s),
                None => naive.push(vec![s]),
            }
        }
        assert_eq!(first_fit(&lens, 64), naive);
    }
}
