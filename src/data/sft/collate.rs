//! Micro-batch collation for SFT: padded unpacked batches (spec §5) and packed bins as THD
//! (`cu_seqlens`, per-sub-sequence position ids; spec §7): the THD offsets the model's
//! attention takes ([`PackedBatch::thd_cu_seqlens`]), or the equivalent dense block-diagonal
//! causal mask ([`PackedBatch::attention_mask`], for references and tests).
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

use super::packing::{PackedBin, PackingMetadata};
use super::SftExample;
use crate::data::sampler::Batch;

/// Padding rules shared by both collates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateParams {
    /// Longest allowed row (`seq_length`, or P for packed data).
    pub max_seq_length: usize,
    /// Pad every batch to `max_seq_length` (forced when PP > 1 or EP > 1).
    pub pad_to_max_length: bool,
    /// Otherwise pad to a multiple of this (`pad_seq_length_to_mult`, 16 in GPTSFTDataset).
    pub pad_seq_length_to_mult: usize,
    /// EOS id: pads tokens and labels.
    pub eos_id: i64,
}

fn ceil_to(n: usize, m: usize) -> usize {
    n.div_ceil(m.max(1)) * m.max(1)
}

impl CollateParams {
    fn padded_len(&self, longest: usize) -> usize {
        if self.pad_to_max_length {
            self.max_seq_length
        } else {
            self.max_seq_length.min(ceil_to(longest, self.pad_seq_length_to_mult))
        }
    }
}

fn push_padded<T: Copy>(dst: &mut Vec<T>, src: &[T], len: usize, pad: T) {
    let n = src.len().min(len);
    dst.extend_from_slice(&src[..n]);
    dst.extend(std::iter::repeat_n(pad, len - n));
}

/// Unpacked collate: `tokens = ids[:-1]`, `labels = ids[1:]`, `loss_mask = mask[1:]`, rows
/// truncated to `max_seq_length` and padded (EOS for tokens/labels, 0 for the mask) to the
/// batch length; position ids `0..len`. `(example, keep)`: `keep = false` zeroes the row's
/// loss mask (a padding sample).
pub fn collate_unpacked(rows: &[(&SftExample, bool)], p: &CollateParams) -> Result<Batch> {
    ensure!(!rows.is_empty(), "empty micro-batch");
    let longest = rows
        .iter()
        .map(|(e, _)| (e.input_ids.len() - 1).max(e.answer_start_idx))
        .max()
        .unwrap_or(0)
        .min(p.max_seq_length);
    let len = p.padded_len(longest);
    let mut b = Batch { batch_size: rows.len(), seq_length: len, ..Default::default() };
    for (e, keep) in rows {
        ensure!(e.input_ids.len() >= 2, "an SFT row needs at least 2 tokens");
        let n = e.input_ids.len();
        push_padded(&mut b.tokens, &e.input_ids[..n - 1], len, p.eos_id);
        push_padded(&mut b.labels, &e.input_ids[1..], len, p.eos_id);
        let mut mask: Vec<f32> = e.loss_mask[1..].iter().map(|&m| f32::from(m)).collect();
        if !keep {
            mask.fill(0.0);
        }
        push_padded(&mut b.loss_mask, &mask, len, 0.0);
        b.position_ids.extend(0..len as i64);
    }
    Ok(b)
}

/// A packed micro-batch: the flat [`Batch`] plus THD boundaries per row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PackedBatch {
    /// tokens / labels / loss_mask / position_ids, `[batch, seq_length]`.
    pub batch: Batch,
    /// Logical boundaries per row: `[0, Σ(len(s_i) − 1)…]`, then `seq_length` when the rows
    /// do not fill it (a padding pseudo-sequence); with `pad_seq_to_mult > 1` trailing pad/EOS
    /// of each sub-sequence are excluded. With `pad_cu_seqlens`, padded with `seq_length` to
    /// `max_samples_per_bin + 2` entries.
    pub cu_seqlens: Vec<Vec<i32>>,
    /// Padded boundaries (what the data occupies), only when `pad_seq_to_mult > 1`.
    pub cu_seqlens_padded: Option<Vec<Vec<i32>>>,
    /// Longest sub-sequence per row (`max(diff(cu_seqlens))`, or the dataset-wide safe value
    /// with `pad_cu_seqlens`).
    pub max_seqlen: Vec<i32>,
}

impl PackedBatch {
    /// The boundaries attention must respect: padded ones when present, else `cu_seqlens`.
    pub fn attention_boundaries(&self) -> &[Vec<i32>] {
        self.cu_seqlens_padded.as_deref().unwrap_or(&self.cu_seqlens)
    }

    /// The attention boundaries of all rows as one THD offset list for the model
    /// (`Microbatch::cu_seqlens`): row `r`'s boundaries shifted by `r·seq_length`, rows
    /// joined. A row whose boundaries stop short of `seq_length` gets one more (padding)
    /// sequence up to it, as in [`block_causal_mask`]; zero-length entries (`pad_cu_seqlens`)
    /// are kept. Attending within these sequences equals [`Self::attention_mask`].
    pub fn thd_cu_seqlens(&self) -> Result<Vec<u32>> {
        let s = self.batch.seq_length;
        let rows = self.attention_boundaries();
        ensure!(
            rows.len() == self.batch.batch_size,
            "packed micro-batch: {} rows of boundaries for {} rows",
            rows.len(),
            self.batch.batch_size
        );
        let mut out = vec![0u32];
        for (r, cu) in rows.iter().enumerate() {
            ensure!(
                cu.first() == Some(&0)
                    && cu.windows(2).all(|w| w[0] <= w[1])
                    && cu.last().is_some_and(|&l| l as usize <= s),
                "packed row {r}: boundaries {cu:?} must start at 0, not decrease and stay within \
                 the {s} tokens of the row"
            );
            let base = u32::try_from(r * s)?;
            out.extend(cu[1..].iter().map(|&c| base + c as u32));
            if (*cu.last().expect("checked") as usize) < s {
                out.push(base + s as u32);
            }
        }
        Ok(out)
    }

    /// Block-diagonal causal mask `[b, 1, s, s]` (u8, nonzero = masked) for the model's
    /// `attention_mask` input (the dense equivalent of [`Self::thd_cu_seqlens`]).
    pub fn attention_mask(&self, device: &Device) -> Result<Tensor> {
        let s = self.batch.seq_length;
        let mut all = Vec::with_capacity(self.batch.batch_size * s * s);
        for cu in self.attention_boundaries() {
            all.extend(block_causal_mask(cu, s));
        }
        Ok(Tensor::from_vec(all, (self.batch.batch_size, 1, s, s), device)?)
    }
}

/// `[s, s]` row-major, 1 = masked: position i may attend to j iff j ≤ i and both lie in the
/// same `[cu[k], cu[k+1])` segment. Positions past the last boundary form one more segment.
pub fn block_causal_mask(cu_seqlens: &[i32], s: usize) -> Vec<u8> {
    let mut seg = vec![0usize; s];
    let mut k = 0;
    for (i, sg) in seg.iter_mut().enumerate() {
        while k + 1 < cu_seqlens.len() && i as i32 >= cu_seqlens[k + 1] {
            k += 1;
        }
        *sg = k;
    }
    let mut m = vec![1u8; s * s];
    for i in 0..s {
        for j in 0..=i {
            if seg[j] == seg[i] {
                m[i * s + j] = 0;
            }
        }
    }
    m
}

/// Packed-collate settings beyond [`CollateParams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedParams {
    /// Padding rules; `max_seq_length` is P.
    pub collate: CollateParams,
    /// `pad_seq_to_mult` the bins were packed with.
    pub pad_seq_to_mult: usize,
    /// `pad_cu_seqlens` (constant-shape boundaries for CUDA graphs).
    pub pad_cu_seqlens: bool,
}

/// Packed collate (`GPTSFTPackedDataset.collate_fn`): per sub-sequence `s`, tokens `s[:-1]`,
/// labels `s[1:]`, the stored (already shifted) mask, positions restarting at 0. As in the
/// reference, loss is also zeroed wherever the input token is EOS (pre-padding).
/// `(bin, keep)`: `keep = false` zeroes the loss mask.
pub fn collate_packed(
    bins: &[(&PackedBin, bool)],
    meta: &[PackingMetadata],
    p: &PackedParams,
) -> Result<PackedBatch> {
    ensure!(!bins.is_empty(), "empty micro-batch");
    let c = &p.collate;
    let mut rows = Vec::with_capacity(bins.len());
    for (bin, keep) in bins {
        let n = bin.input_ids.len();
        ensure!(
            bin.seq_start_id.first() == Some(&0)
                && bin.seq_start_id.windows(2).all(|w| w[0] < w[1])
                && bin.seq_start_id.last().is_some_and(|&l| l < n)
                && bin.loss_mask.len() == n,
            "malformed packed bin: seq_start_id {:?} for {n} tokens ({} mask entries)",
            bin.seq_start_id,
            bin.loss_mask.len()
        );
        let mut bounds = bin.seq_start_id.clone();
        bounds.push(n);
        let (mut toks, mut labs, mut mask, mut pos) = (vec![], vec![], vec![], vec![]);
        let (mut cu, mut cu_logical) = (vec![0i32], vec![0i32]);
        for w in bounds.windows(2) {
            let (a, b) = (w[0], w[1]);
            toks.extend_from_slice(&bin.input_ids[a..b - 1]);
            labs.extend_from_slice(&bin.input_ids[a + 1..b]);
            mask.extend(
                bin.loss_mask[a..b - 1].iter().map(|&m| if *keep { f32::from(m) } else { 0.0 }),
            );
            pos.extend(0..(b - a - 1) as i64);
            cu.push(cu.last().expect("non-empty") + (b - a - 1) as i32);
            let sub = &bin.input_ids[a..b - 1];
            let real = sub.iter().rposition(|&t| t != c.eos_id).map_or(0, |i| i + 1);
            cu_logical.push(cu_logical.last().expect("non-empty") + real as i32);
        }
        rows.push((toks, labs, mask, pos, cu, cu_logical));
    }
    let longest = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    ensure!(
        longest <= c.max_seq_length,
        "packed bin of {longest} tokens exceeds the pack size {}",
        c.max_seq_length
    );
    let len = c.padded_len(longest);
    let mut out = PackedBatch {
        batch: Batch { batch_size: bins.len(), seq_length: len, ..Default::default() },
        ..Default::default()
    };
    let mut padded_all = Vec::new();
    for (toks, labs, mut mask, pos, mut cu, mut cu_logical) in rows {
        for (m, t) in mask.iter_mut().zip(&toks) {
            if *t == c.eos_id {
                *m = 0.0;
            }
        }
        push_padded(&mut out.batch.tokens, &toks, len, c.eos_id);
        push_padded(&mut out.batch.labels, &labs, len, c.eos_id);
        push_padded(&mut out.batch.loss_mask, &mask, len, 0.0);
        push_padded(&mut out.batch.position_ids, &pos, len, 0);
        if *cu.last().expect("non-empty") != len as i32 {
            cu.push(len as i32);
        }
        if p.pad_seq_to_mult > 1 && cu.len() > cu_logical.len() {
            cu_logical.push(*cu_logical.last().expect("non-empty"));
        }
        let mut logical = if p.pad_seq_to_mult > 1 { cu_logical } else { cu.clone() };
        let max_seqlen = if p.pad_cu_seqlens {
            let max_per_bin = meta.iter().map(|m| m.max_samples_per_bin).max().unwrap_or(0);
            let fill = (max_per_bin + 2).saturating_sub(logical.len());
            logical.extend(std::iter::repeat_n(len as i32, fill));
            let ds_max = meta.iter().map(|m| m.dataset_max_seqlen).max().unwrap_or(0);
            let min_pack = meta.iter().map(|m| m.min_packed_seqlen).min().unwrap_or(0);
            ds_max.max(len.saturating_sub(min_pack)) as i32
        } else {
            cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
        };
        out.max_seqlen.push(max_seqlen);
        out.cu_seqlens.push(logical);
        padded_all.push(cu);
    }
    if p.pad_seq_to_mult > 1 {
        out.cu_seqlens_padded = Some(padded_all);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vector_unpacked() {
        let ex = SftExample {
            input_ids: vec![5, 7, 8, 2],
            loss_mask: vec![0, 1, 1, 1],
            answer_start_idx: 1,
        };
        let p = CollateParams {
            max_seq_length: 8,
            pad_to_max_length: false,
            pad_seq_length_to_mult: 1,
            eos_id: 2,
        };
        let b = collate_unpacked(&[(&ex, true)], &p).unwrap();
        assert_eq!(b.tokens, vec![5, 7, 8]);
        assert_eq!(b.labels, vec![7, 8, 2]);
        assert_eq!(b.loss_mask, vec![1.0, 1.0, 1.0]);
        assert_eq!(b.position_ids, vec![0, 1, 2]);
        let p = CollateParams { pad_seq_length_to_mult: 4, ..p };
        let b = collate_unpacked(&[(&ex, false)], &p).unwrap();
        assert_eq!(b.tokens, vec![5, 7, 8, 2]);
        assert_eq!(b.loss_mask, vec![0.0; 4]);
    }

    #[test]
    fn spec_vector_packed() {
        // Rows A (4 tokens) and B (3 tokens) in one bin, P = 8.
        let bin = PackedBin {
            input_ids: vec![10, 11, 12, 13, 20, 21, 22],
            loss_mask: vec![0, 1, 1, 0, 1, 1, 0],
            seq_start_id: vec![0, 4],
        };
        let collate = CollateParams {
            max_seq_length: 8,
            pad_to_max_length: true,
            pad_seq_length_to_mult: 1,
            eos_id: 2,
        };
        let p = PackedParams { collate, pad_seq_to_mult: 1, pad_cu_seqlens: false };
        let b = collate_packed(&[(&bin, true)], &[], &p).unwrap();
        assert_eq!(&b.batch.tokens[..5], &[10, 11, 12, 20, 21]);
        assert_eq!(&b.batch.labels[..5], &[11, 12, 13, 21, 22]);
        assert_eq!(b.batch.position_ids, vec![0, 1, 2, 0, 1, 0, 0, 0]);
        assert_eq!(b.cu_seqlens, vec![vec![0, 3, 5, 8]]);
        assert_eq!(b.max_seqlen, vec![3]);
        let p2 = PackedParams {
            collate: CollateParams {
                pad_to_max_length: false,
                pad_seq_length_to_mult: 1,
                ..collate
            },
            ..p
        };
        let b = collate_packed(&[(&bin, true)], &[], &p2).unwrap();
        assert_eq!(b.cu_seqlens, vec![vec![0, 3, 5]]);
        let p3 = PackedParams {
            collate: CollateParams {
                pad_to_max_length: false,
                pad_seq_length_to_mult: 4,
                ..collate
            },
            ..p
        };
        let b = collate_packed(&[(&bin, true)], &[], &p3).unwrap();
        assert_eq!(b.cu_seqlens, vec![vec![0, 3, 5, 8]]);
        // THD offsets: the padding sequence up to 8 is part of them.
        assert_eq!(b.thd_cu_seqlens().unwrap(), vec![0, 3, 5, 8]);
        let m = block_causal_mask(&[0, 3, 5], 5);
        // Row 3 (first token of B) sees only itself.
        assert_eq!(&m[3 * 5..4 * 5], &[1, 1, 1, 0, 1]);
        assert_eq!(&m[2 * 5..3 * 5], &[0, 0, 0, 1, 1]);
    }

    /// Two rows flatten into one offset list (row 1 shifted by s); a row that stops short of
    /// s gets the padding sequence, `pad_cu_seqlens` repeats stay; bad boundaries are named.
    #[test]
    fn thd_offsets_of_several_rows() {
        let mut b = PackedBatch {
            batch: Batch { batch_size: 2, seq_length: 8, ..Default::default() },
            cu_seqlens: vec![vec![0, 3, 5], vec![0, 6, 8, 8, 8]],
            ..Default::default()
        };
        assert_eq!(b.thd_cu_seqlens().unwrap(), vec![0, 3, 5, 8, 14, 16, 16, 16]);
        // Padded boundaries win when present (pad_seq_to_mult > 1).
        b.cu_seqlens_padded = Some(vec![vec![0, 4, 8], vec![0, 8]]);
        assert_eq!(b.thd_cu_seqlens().unwrap(), vec![0, 4, 8, 16]);
        b.cu_seqlens_padded = Some(vec![vec![0, 4, 9], vec![0, 8]]);
        let e = b.thd_cu_seqlens().unwrap_err().to_string();
        assert!(e.contains("packed row 0") && e.contains("8 tokens"), "{e}");
        b.cu_seqlens_padded = Some(vec![vec![0, 8]]);
        assert!(b.thd_cu_seqlens().unwrap_err().to_string().contains("1 rows of boundaries"));
    }
}
