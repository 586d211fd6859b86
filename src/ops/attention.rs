//! Causal (optionally sliding-window) grouped-query attention, differentiable.

use super::dropout::DropoutRng;
use super::flash::{self, FlashSpec, PackedSeqs};
use super::softmax::masked_softmax;
use crate::config::model::AttnBackend;
use candle_core::{DType, Device, Result, Tensor};

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads (local to this TP rank).
    pub heads: usize,
    /// Key/value heads = query groups (local to this TP rank).
    pub groups: usize,
    /// Per-head channels.
    pub head_dim: usize,
    /// Multiplier on `q·k` (Megatron: `1/sqrt(kv_channels)`).
    pub softmax_scale: f64,
    /// Which implementation runs on CUDA (`model.attention_backend`).
    pub backend: AttnBackend,
}

impl AttentionShape {
    /// The flash call of causal attention with this scale and backend, limited to the
    /// `window_left` previous keys when given.
    pub fn causal_flash(&self, window_left: Option<i64>) -> FlashSpec {
        FlashSpec {
            causal: true,
            window_left,
            softmax_scale: self.softmax_scale,
            backend: self.backend,
        }
    }
}

/// Builds the boolean "may attend" mask `[B, 1, sq, sk]` (u8, 1 = attend) for queries at
/// absolute positions `q_start..q_start+sq` over keys `0..sk`: causal, limited to the
/// `window_left` previous tokens when set (Megatron/TE `window_size = [left, right]` with
/// `right = 0`; a negative `left` means unlimited), and further restricted by an optional
/// Megatron-style `attention_mask` `[B, 1, sq, sk]` where nonzero means *masked out*.
pub fn build_attention_mask(
    q_start: usize,
    sq: usize,
    sk: usize,
    window_left: Option<i64>,
    extra_masked_out: Option<&Tensor>,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0u8; sq * sk];
    for i in 0..sq {
        let qi = (q_start + i) as i64;
        for j in 0..sk {
            let kj = j as i64;
            let causal = kj <= qi;
            let in_window = match window_left {
                Some(left) if left >= 0 => qi - kj <= left,
                _ => true,
            };
            m[i * sk + j] = u8::from(causal && in_window);
        }
    }
    let base = Tensor::from_vec(m, (1, 1, sq, sk), device)?;
    match extra_masked_out {
        None => Ok(base),
        Some(extra) => {
            let keep = extra.to_dtype(DType::U8)?.eq(0u8)?.to_dtype(DType::U8)?;
            keep.broadcast_mul(&base)
        }
    }
}

/// The "may attend" mask `[rows, 1, seq, seq]` (u8, 1 = attend) of packed sequences: causal
/// within each sequence of `seqs` (limited to `window_left` previous tokens when set, as in
/// [`build_attention_mask`]), nothing across sequences. Bit for bit what
/// [`build_attention_mask`] makes from a block-diagonal `extra_masked_out` of the same
/// boundaries, so the composite path gives the same numbers with either representation.
pub fn build_packed_attention_mask(
    seqs: &PackedSeqs,
    window_left: Option<i64>,
    device: &Device,
) -> Result<Tensor> {
    let (rows, s) = (seqs.rows(), seqs.seq());
    let mut m = vec![0u8; rows * s * s];
    for w in seqs.offsets().windows(2) {
        let (a, e) = (w[0] as usize, w[1] as usize);
        if a == e {
            continue; // zero-length padding entry
        }
        // PackedSeqs guarantees row starts are boundaries: [a, e) lies inside row a / s.
        let (r, first) = (a / s, a % s);
        let block = &mut m[r * s * s..(r + 1) * s * s];
        for i in 0..e - a {
            for j in 0..=i {
                let in_window = match window_left {
                    Some(left) if left >= 0 => (i - j) as i64 <= left,
                    _ => true,
                };
                block[(first + i) * s + first + j] = u8::from(in_window);
            }
        }
    }
    Tensor::from_vec(m, (rows, 1, s, s), device)
}

/// Scaled-dot-product attention with grouped queries.
///
/// `q` is `[b, heads, sq, d]` with heads ordered group-major (head `g·hpg + j` belongs to
/// group `g`, as Megatron's per-group QKV layout yields), `k`/`v` are `[b, groups, sk, d]`,
/// `allowed` is the u8 mask of [`build_attention_mask`]. Instead of repeating K/V per head,
/// the `hpg` heads of a group are folded into the query-length axis so one batched matmul per
/// group serves them all. `dropout` = (attention_dropout, mask source, (tp_rank, tp_size))
/// drops attention probabilities in training; with TP the heads are this rank's share and the
/// mask is the matching slice of the TP=1 mask. Returns `[b, heads, sq, d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    allowed: &Tensor,
    shape: AttentionShape,
    dropout: Option<(f64, &DropoutRng, (usize, usize))>,
) -> Result<Tensor> {
    let (b, heads, sq, d) = q.dims4()?;
    let (_, groups, sk, _) = k.dims4()?;
    if heads != shape.heads || groups != shape.groups || heads % groups != 0 {
        candle_core::bail!(
            "attention: got {heads} query heads / {groups} kv heads, expected {} / {}",
            shape.heads,
            shape.groups
        );
    }
    let hpg = heads / groups;
    let qg = q.reshape((b, groups, hpg * sq, d))?;
    let scores = qg.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let scores = scores.reshape((b, groups, hpg, sq, sk))?;
    // Softmax in fp32 for half-precision inputs (Megatron's attention_softmax_in_fp32).
    let in_dtype = scores.dtype();
    let scores = match in_dtype {
        DType::BF16 | DType::F16 => scores.to_dtype(DType::F32)?,
        _ => scores,
    };
    let probs = masked_softmax(&scores, allowed, shape.softmax_scale)?.to_dtype(in_dtype)?;
    let probs = match dropout {
        // probs are [b, groups, hpg, sq, sk]: a TP rank holds a contiguous range of groups.
        Some((p, rng, (rank, size))) => rng.dropout_shard(&probs, p, 1, rank, size)?,
        None => probs,
    };
    let out = probs.reshape((b, groups, hpg * sq, sk))?.matmul(&v.contiguous()?)?;
    out.reshape((b, heads, sq, d))
}

/// Which keys each query may attend to.
#[derive(Debug, Clone, Copy)]
pub enum AttnMask<'a> {
    /// A prebuilt u8 mask from [`build_attention_mask`] (packed sequences, or no fused kernel).
    Dense(&'a Tensor),
    /// Causal with the queries at the last `sq` of the `sk` key positions (KV cache),
    /// optionally limited to `window_left` previous keys. With the fused kernel no mask (and no
    /// `sq×sk` score) tensor is ever built; otherwise the dense mask is built here.
    Causal { window_left: Option<i64> },
    /// Packed sequences (THD, `cu_seqlens`): causal (and windowed) within each sequence of
    /// `seqs`, never across. The fused kernel takes the offsets as they are (no `s×s` mask);
    /// otherwise [`build_packed_attention_mask`] is built here.
    Packed { seqs: &'a PackedSeqs, window_left: Option<i64> },
}

/// [`AttnMask`] owning its data, for state kept past the forward call (a written-out
/// backward).
#[derive(Debug, Clone)]
pub enum OwnedAttnMask {
    Dense(Tensor),
    Causal { window_left: Option<i64> },
    Packed { seqs: PackedSeqs, window_left: Option<i64> },
}

impl OwnedAttnMask {
    pub fn from_mask(mask: AttnMask) -> Self {
        match mask {
            AttnMask::Dense(m) => Self::Dense(m.clone()),
            AttnMask::Causal { window_left } => Self::Causal { window_left },
            AttnMask::Packed { seqs, window_left } => {
                Self::Packed { seqs: seqs.clone(), window_left }
            }
        }
    }

    pub fn as_mask(&self) -> AttnMask<'_> {
        match self {
            Self::Dense(m) => AttnMask::Dense(m),
            Self::Causal { window_left } => AttnMask::Causal { window_left: *window_left },
            Self::Packed { seqs, window_left } => {
                AttnMask::Packed { seqs, window_left: *window_left }
            }
        }
    }
}

/// [`attention`] with the mask described by `mask`: the fused flash-attention kernel when it
/// supports the call (CUDA, bf16/f16, no attention dropout, see
/// [`flash::unsupported_reason`]), else the composite reference.
pub fn attention_auto(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttnMask,
    shape: AttentionShape,
    dropout: Option<(f64, &DropoutRng, (usize, usize))>,
) -> Result<Tensor> {
    match mask {
        AttnMask::Dense(m) => attention(q, k, v, m, shape, dropout),
        AttnMask::Causal { window_left } => {
            let p = dropout.map_or(0.0, |(p, _, _)| p);
            if flash::unsupported_reason(q, k, v, p).is_none() {
                let spec = shape.causal_flash(window_left);
                return flash::flash_attention(q, k, v, spec);
            }
            let (sq, sk) = (q.dim(2)?, k.dim(2)?);
            let m =
                build_attention_mask(sk.saturating_sub(sq), sq, sk, window_left, None, q.device())?;
            attention(q, k, v, &m, shape, dropout)
        }
        AttnMask::Packed { seqs, window_left } => {
            let (b, heads, sq, d) = q.dims4()?;
            let sk = k.dim(2)?;
            if sq != sk || b != seqs.rows() || sq != seqs.seq() {
                candle_core::bail!(
                    "packed attention: {b} rows of {sq} queries over {sk} keys, but cu_seqlens \
                     describe {} rows of {} tokens (packed sequences cannot use a KV cache)",
                    seqs.rows(),
                    seqs.seq()
                );
            }
            let p = dropout.map_or(0.0, |(p, _, _)| p);
            if flash::unsupported_reason(q, k, v, p).is_none() {
                let spec = shape.causal_flash(window_left);
                if b == 1 {
                    return flash::flash_attention_packed(q, k, v, spec, seqs);
                }
                // The kernel walks one token stream: rows become consecutive stretches of it
                // (free for q, whose [b, s, h, d] memory is contiguous; a copy for strided k/v).
                let flat = |t: &Tensor| -> Result<Tensor> {
                    let (_, h, _, _) = t.dims4()?;
                    t.transpose(1, 2)?.reshape((1, b * sq, h, d))?.transpose(1, 2)
                };
                let out =
                    flash::flash_attention_packed(&flat(q)?, &flat(k)?, &flat(v)?, spec, seqs)?;
                // [1, heads, b·s, d] is a view of [1, b·s, heads, d] memory: back to rows for free.
                return out.transpose(1, 2)?.reshape((b, sq, heads, d))?.transpose(1, 2);
            }
            let m = build_packed_attention_mask(seqs, window_left, q.device())?;
            attention(q, k, v, &m, shape, dropout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// `heads` query heads over `groups` key/value heads of dimension 8, the default backend.
    fn test_shape(heads: usize, groups: usize) -> AttentionShape {
        AttentionShape {
            heads,
            groups,
            head_dim: 8,
            softmax_scale: 0.35,
            backend: AttnBackend::Auto,
        }
    }

    /// Off the fused path, `AttnMask::Causal` must mean exactly the dense mask the model used to
    /// build: bottom-right aligned (KV cache: queries are the last sq of sk) and windowed.
    #[test]
    fn causal_mask_falls_back_to_the_dense_mask() {
        let shape = test_shape(4, 2);
        for (sq, sk, window) in [(6, 6, None), (3, 7, None), (5, 9, Some(2)), (7, 7, Some(0))] {
            let q = rand((2, 4, sq, 8), 1);
            let k = rand((2, 2, sk, 8), 2);
            let v = rand((2, 2, sk, 8), 3);
            let auto =
                attention_auto(&q, &k, &v, AttnMask::Causal { window_left: window }, shape, None)
                    .unwrap();
            let m = build_attention_mask(sk - sq, sq, sk, window, None, &Device::Cpu).unwrap();
            let dense = attention(&q, &k, &v, &m, shape, None).unwrap();
            let diff = (auto - dense).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "sq {sq} sk {sk} window {window:?}");
        }
    }

    /// The packed mask equals the dense mask the trainer used to pass (block-diagonal
    /// `extra_masked_out` from the collate), for several rows, zero-length padding sequences,
    /// a padding tail and windows; so does attention through `AttnMask::Packed` on CPU.
    #[test]
    fn packed_mask_equals_block_diagonal_dense_mask() {
        use crate::data::sft::block_causal_mask;
        let s = 9;
        // Per-row boundaries as the collate makes them (row 1 ends with pad_cu_seqlens repeats).
        let rows: [&[i32]; 2] = [&[0, 4, 7, 9], &[0, 2, 2, 6, 9, 9, 9]];
        let mut thd = vec![0u32];
        let mut extra = Vec::new();
        for (r, cu) in rows.iter().enumerate() {
            thd.extend(cu[1..].iter().map(|&c| (r * s) as u32 + c as u32));
            extra.extend(block_causal_mask(cu, s));
        }
        let extra = Tensor::from_vec(extra, (2, 1, s, s), &Device::Cpu).unwrap();
        let seqs = PackedSeqs::new(&thd, 2, s, &Device::Cpu).unwrap();
        let shape = test_shape(4, 2);
        let (q, k, v) = (rand((2, 4, s, 8), 7), rand((2, 2, s, 8), 8), rand((2, 2, s, 8), 9));
        for window in [None, Some(1), Some(-1)] {
            let packed = build_packed_attention_mask(&seqs, window, &Device::Cpu).unwrap();
            let dense = build_attention_mask(0, s, s, window, Some(&extra), &Device::Cpu).unwrap();
            let p = packed.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let d = dense.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            assert_eq!(p, d, "window {window:?}");
            let mask = AttnMask::Packed { seqs: &seqs, window_left: window };
            let auto = attention_auto(&q, &k, &v, mask, shape, None).unwrap();
            let want = attention(&q, &k, &v, &dense, shape, None).unwrap();
            let diff = (auto - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "window {window:?}");
        }
        // Boundaries for another shape are refused with the shapes named.
        let mask = AttnMask::Packed { seqs: &seqs, window_left: None };
        let q1 = rand((1, 4, 2 * s, 8), 1);
        let k1 = rand((1, 2, 2 * s, 8), 2);
        let err = attention_auto(&q1, &k1, &k1, mask, shape, None).unwrap_err().to_string();
        assert!(err.contains("describe 2 rows of 9 tokens"), "{err}");
    }

    /// A window changes the result (so the test above would notice a dropped window).
    #[test]
    fn window_matters() {
        let shape = test_shape(2, 1);
        let (q, k, v) = (rand((1, 2, 8, 8), 4), rand((1, 1, 8, 8), 5), rand((1, 1, 8, 8), 6));
        let full = attention_auto(&q, &k, &v, AttnMask::Causal { window_left: None }, shape, None);
        let win =
            attention_auto(&q, &k, &v, AttnMask::Causal { window_left: Some(1) }, shape, None);
        let diff = (full.unwrap() - win.unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 1e-4);
    }
}
