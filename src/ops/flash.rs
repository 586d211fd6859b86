//! When the fused flash-attention kernel (`kernels/flash_attn.cu`, launched from
//! `ops::cuda::flash_attn`) can replace the composite [`super::attention`], and how its
//! operands are addressed. Kept free of CUDA types so the dispatch rules are tested on CPU.

use crate::config::model::AttnBackend;
use candle_core::{DType, Device, Layout, Result, Shape, Tensor};

/// Head dims the kernel is instantiated for (`FA_INSTANCE` in `kernels/flash_attn.cu`).
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Masking and scaling of one flash-attention call (the head layout comes from the tensors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashSpec {
    /// Query `i` sees keys `j <= i + sk - sq` (bottom-right aligned, as a KV cache needs).
    pub causal: bool,
    /// Only the `left` previous keys as well (Megatron `window_size[0]`; negative = none).
    pub window_left: Option<i64>,
    /// Multiplier on `q·k`.
    pub softmax_scale: f64,
    /// cuDNN's fused attention or mbridge's kernels (`model.attention_backend`; the
    /// composite backends never reach the flash entry points).
    pub backend: AttnBackend,
}

impl FlashSpec {
    /// The kernel's `window_left` argument: -1 when unlimited.
    pub fn kernel_window(&self) -> i32 {
        match self.window_left {
            Some(l) if l >= 0 => l.min(i32::MAX as i64) as i32,
            _ => -1,
        }
    }
}

/// Whether a flash call goes to cuDNN's fused attention (`ops::cuda::cudnn::sdpa`) rather
/// than mbridge's kernels: the `auto` or `fused` backend, and a call its graph covers, causal
/// self-attention over whole rows (`sq == sk`; no sliding window, no packed sequences).
pub fn cudnn_covers(spec: &FlashSpec, sq: usize, sk: usize, packed: bool) -> bool {
    matches!(spec.backend, AttnBackend::Auto | AttnBackend::Fused)
        && spec.causal
        && spec.kernel_window() < 0
        && !packed
        && sq == sk
}

/// Element strides `(batch, head, seq)` of a `[b, h, s, d]` operand, or None when the kernel
/// cannot read it in place: the last dim must be dense and every row must start on a 16-byte
/// boundary (cp.async moves 16 bytes = 8 half-precision values at a time).
pub fn kernel_strides(layout: &Layout) -> Option<[usize; 3]> {
    let &[b, h, s] = dense_rows(layout)? else { return None };
    Some([b, h, s])
}

/// The strides of every dimension but the last of an operand whose last dimension is dense
/// and non-empty, whose rows all start on a 16-byte boundary (cp.async moves 16 bytes = 8
/// half-precision values at a time), or None.
fn dense_rows(layout: &Layout) -> Option<&[usize]> {
    let (stride, dims) = (layout.stride(), layout.dims());
    let (&last, outer) = stride.split_last()?;
    if last != 1 || dims.last() == Some(&0) {
        return None;
    }
    let aligned = |x: usize| x.is_multiple_of(8);
    (aligned(layout.start_offset()) && outer.iter().all(|&s| aligned(s))).then_some(outer)
}

/// `(b, heads, sq, d)` of a query operand: `[b, heads, sq, d]`, or `[b, groups, hpg, sq, d]`
/// (the query heads of each kv group, as they lie in the fused QKV buffer).
pub fn query_dims(q: &Tensor) -> Result<(usize, usize, usize, usize)> {
    query_shape(q.shape())
}

/// [`query_dims`] of a shape.
pub fn query_shape(shape: &Shape) -> Result<(usize, usize, usize, usize)> {
    match *shape.dims() {
        [b, g, hpg, sq, d] => Ok((b, g * hpg, sq, d)),
        _ => shape.dims4(),
    }
}

/// The collapsed `[b, heads, sq, d]` form of a query operand (a copy for a grouped view).
pub fn query_heads(q: &Tensor) -> Result<Tensor> {
    let (b, heads, sq, d) = query_dims(q)?;
    if q.rank() == 4 {
        return Ok(q.clone());
    }
    q.reshape((b, heads, sq, d))
}

/// Element strides `(batch, group, head within the group, seq)` of a query operand (see
/// [`query_dims`]) over `groups` kv groups, or None when the kernel cannot read it in place
/// (the rules of [`kernel_strides`]). The fused QKV buffer's query heads are evenly spaced
/// within a group but not across groups, so a view of it needs the fourth stride.
pub fn query_strides(layout: &Layout, groups: usize) -> Option<[usize; 4]> {
    match (layout.dims(), dense_rows(layout)?) {
        (&[_, heads, _, _], &[bs, hs, ss]) => Some([bs, heads.checked_div(groups)? * hs, hs, ss]),
        (&[_, g, _, _, _], &[bs, gs, hs, ss]) if g == groups => Some([bs, gs, hs, ss]),
        _ => None,
    }
}

/// Checks packed-sequence offsets: at least one sequence, starting at token 0, non-decreasing,
/// within the kernel's 32-bit indices.
pub fn check_cu_seqlens(cu: &[u32]) -> std::result::Result<(), String> {
    if cu.len() < 2 || cu[0] != 0 {
        return Err(format!("cu_seqlens must start at 0 and hold >= 2 offsets, got {cu:?}"));
    }
    if cu.windows(2).any(|w| w[1] < w[0]) {
        return Err(format!("cu_seqlens must not decrease, got {cu:?}"));
    }
    if cu[cu.len() - 1] > i32::MAX as u32 {
        return Err("cu_seqlens exceed 2^31 tokens".into());
    }
    Ok(())
}

/// Checks THD offsets of a micro-batch of `rows` rows of `seq` tokens flattened row-major:
/// [`check_cu_seqlens`], they end at `rows * seq`, and every row start is a boundary (a
/// sequence never continues into the next row, as the dense block-diagonal mask assumes).
pub fn check_packed_rows(cu: &[u32], rows: usize, seq: usize) -> std::result::Result<(), String> {
    check_cu_seqlens(cu)?;
    let total = rows * seq;
    let last = cu[cu.len() - 1] as usize;
    if last != total {
        return Err(format!(
            "cu_seqlens end at token {last} but the micro-batch holds {rows} x {seq} = {total} tokens"
        ));
    }
    if let Some(r) = (1..rows).find(|r| cu.binary_search(&((r * seq) as u32)).is_err()) {
        return Err(format!(
            "cu_seqlens {cu:?}: row {r} starts at token {} which is no sequence boundary (a \
             packed sequence must not cross rows)",
            r * seq
        ));
    }
    Ok(())
}

/// Packed (THD) sequences of one forward pass: a micro-batch of `rows` rows of `seq` tokens,
/// flattened row-major into one token stream cut into sequences by `offsets` (row `r` of a
/// `[b, s]` batch starts at `r·s`). Sequences of length zero are allowed (the padding entries
/// of `pad_cu_seqlens`); each token attends causally within its own sequence only.
#[derive(Debug, Clone)]
pub struct PackedSeqs {
    offsets: Vec<u32>,
    rows: usize,
    seq: usize,
    /// `offsets` (u32) on the model's device, uploaded once per forward pass rather than once
    /// per layer (the fused kernel reads them there).
    on_device: Tensor,
}

impl PackedSeqs {
    /// Validates `offsets` for a `[rows, seq]` micro-batch (see [`check_packed_rows`]) and
    /// copies them to `device`.
    pub fn new(offsets: &[u32], rows: usize, seq: usize, device: &Device) -> Result<Self> {
        check_packed_rows(offsets, rows, seq).map_err(candle_core::Error::Msg)?;
        let on_device = Tensor::new(offsets, device)?;
        Ok(Self { offsets: offsets.to_vec(), rows, seq, on_device })
    }

    /// Token offsets `[nseq + 1]` into the flattened micro-batch.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    /// [`Self::offsets`] as a u32 tensor on the model's device.
    pub fn device_offsets(&self) -> &Tensor {
        &self.on_device
    }

    /// Rows of the micro-batch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tokens per row.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// The longest sequence (sizes the kernel's grid).
    pub fn max_seqlen(&self) -> usize {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }
}

/// Whether a build of this binary can run flash attention at all on `device` for `dtype`.
pub fn device_supports(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16)
}

/// Whether a model forward should skip the dense mask and describe attention as causal (the
/// fused kernel then runs): a CUDA half-precision model whose `attention_backend` is not a
/// composite one, no extra dense mask (packed sequences come as offsets and keep the fast
/// path), and no attention dropout in this pass.
pub fn model_fast_path(
    device: &Device,
    dtype: DType,
    backend: AttnBackend,
    extra_mask: bool,
    dropout_active: bool,
) -> bool {
    let composite = matches!(backend, AttnBackend::Unfused | AttnBackend::Local);
    device_supports(device, dtype) && !composite && !extra_mask && !dropout_active
}

/// Flash attention for `q` `[b, heads, sq, d]`, `k`/`v` `[b, groups, sk, d]` (no packing).
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: FlashSpec) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        super::cuda::flash_attn::flash_attention(q, k, v, spec, None)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, spec);
        candle_core::bail!("flash attention needs a build with the `cuda` feature")
    }
}

/// Flash attention over packed sequences: `q` `[1, heads, T, d]`, `k`/`v` `[1, groups, T, d]`
/// with `T` = all tokens of the micro-batch (`seqs.rows() · seqs.seq()`, rows flattened).
pub fn flash_attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: FlashSpec,
    seqs: &PackedSeqs,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let varlen = super::cuda::flash_attn::Varlen::from_packed(seqs);
        super::cuda::flash_attn::flash_attention(q, k, v, spec, Some(varlen))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, spec, seqs);
        candle_core::bail!("flash attention needs a build with the `cuda` feature")
    }
}

/// Why flash attention cannot take `q` `[b, heads, sq, d]`, `k`/`v` `[b, groups, sk, d]`
/// (None = it can). Anything it rejects runs the composite reference instead.
pub fn unsupported_reason(q: &Tensor, k: &Tensor, v: &Tensor, dropout_p: f64) -> Option<String> {
    if dropout_p > 0.0 {
        return Some(format!("attention dropout {dropout_p} (the kernel has none)"));
    }
    let (Ok((b, heads, sq, d)), Ok((bk, groups, sk, dk)), Ok(vd)) =
        (query_dims(q), k.dims4(), v.dims4())
    else {
        return Some("q must be 4-D or grouped 5-D, k and v 4-D".into());
    };
    if q.rank() == 5 && q.dim(1).ok() != Some(groups) {
        return Some(format!("grouped q {:?} does not match k's {groups} groups", q.dims()));
    }
    if vd != (bk, groups, sk, dk) || bk != b || dk != d {
        return Some(format!("k {:?} / v {:?} do not match q {:?}", k.dims(), v.dims(), q.dims()));
    }
    if !HEAD_DIMS.contains(&d) {
        return Some(format!("head_dim {d} (kernel has {HEAD_DIMS:?})"));
    }
    if groups == 0 || !heads.is_multiple_of(groups) {
        return Some(format!("{heads} heads not a multiple of {groups} groups"));
    }
    if sq > sk {
        return Some(format!("more queries ({sq}) than keys ({sk})"));
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Some("q, k, v dtypes differ".into());
    }
    if !device_supports(q.device(), q.dtype()) {
        return Some(format!("{:?} on {:?} (needs bf16/f16 on CUDA)", q.dtype(), q.device()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_of_contiguous_and_transposed_views() {
        let l = Layout::contiguous(Shape::from((2, 4, 16, 64)));
        assert_eq!(kernel_strides(&l), Some([4 * 16 * 64, 16 * 64, 64]));
        // [b, s, h, d] storage viewed as [b, h, s, d]: what the kernel writes and reads.
        let t = Layout::contiguous(Shape::from((2, 16, 4, 64))).transpose(1, 2).unwrap();
        assert_eq!(kernel_strides(&t), Some([16 * 4 * 64, 64, 4 * 64]));
    }

    #[test]
    fn query_strides_of_head_views_and_fused_qkv_groups() {
        // Ordinary [b, heads, s, d]: the group stride spans hpg heads.
        let l = Layout::contiguous(Shape::from((2, 8, 16, 64)));
        assert_eq!(query_strides(&l, 2), Some([8 * 16 * 64, 4 * 16 * 64, 16 * 64, 64]));
        // The query heads inside a fused QKV [b, s, groups, hpg + 2, d], viewed as
        // [b, groups, hpg, s, d]: groups lie (hpg + 2)·d apart, heads d apart.
        let (b, s, g, hpg, d) = (2, 16, 2, 4, 64);
        let fused = Layout::contiguous(Shape::from((b, s, g, hpg + 2, d)));
        let q = fused.narrow(3, 0, hpg).unwrap().permute(&[0, 2, 3, 1, 4]).unwrap();
        let row = g * (hpg + 2) * d;
        assert_eq!(query_strides(&q, g), Some([s * row, (hpg + 2) * d, d, row]));
        // Wrong group count, or a strided head dim: not readable in place.
        assert_eq!(query_strides(&q, 4), None);
        let t = Layout::contiguous(Shape::from((1, 2, 2, 64, 8))).transpose(3, 4).unwrap();
        assert_eq!(query_strides(&t, 2), None);
    }

    #[test]
    fn rejects_strided_last_dim_and_misaligned_rows() {
        let t = Layout::contiguous(Shape::from((1, 2, 64, 8))).transpose(2, 3).unwrap();
        assert_eq!(kernel_strides(&t), None);
        // A row offset of 4 elements (8 bytes) cannot be copied 16 bytes at a time.
        let off = Layout::contiguous_with_offset(Shape::from((1, 1, 4, 64)), 4);
        assert_eq!(kernel_strides(&off), None);
        let ok = Layout::contiguous_with_offset(Shape::from((1, 1, 4, 64)), 64);
        assert!(kernel_strides(&ok).is_some());
    }

    #[test]
    fn cpu_tensors_and_dropout_take_the_composite_path() {
        let q = Tensor::zeros((1, 4, 8, 64), DType::BF16, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 2, 8, 64), DType::BF16, &Device::Cpu).unwrap();
        assert!(unsupported_reason(&q, &k, &k, 0.0).unwrap().contains("CUDA"));
        assert!(unsupported_reason(&q, &k, &k, 0.1).unwrap().contains("dropout"));
        assert!(!device_supports(&Device::Cpu, DType::BF16));
    }

    #[test]
    fn shape_problems_are_named() {
        let z = |s: &[usize]| Tensor::zeros(s, DType::BF16, &Device::Cpu).unwrap();
        let r = |q: &[usize], k: &[usize]| unsupported_reason(&z(q), &z(k), &z(k), 0.0).unwrap();
        assert!(r(&[1, 4, 8, 96], &[1, 2, 8, 96]).contains("head_dim 96"));
        assert!(r(&[1, 6, 8, 64], &[1, 4, 8, 64]).contains("groups"));
        assert!(r(&[1, 4, 9, 64], &[1, 2, 8, 64]).contains("more queries"));
        assert!(r(&[1, 4, 8, 64], &[1, 2, 8, 128]).contains("do not match"));
        // A supported shape on CPU is refused only for the device.
        assert!(r(&[2, 8, 8, 128], &[2, 2, 16, 128]).contains("CUDA"));
    }

    #[test]
    fn model_fast_path_needs_cuda_and_no_mask_or_dropout() {
        for backend in [AttnBackend::Auto, AttnBackend::Unfused] {
            assert!(!model_fast_path(&Device::Cpu, DType::BF16, backend, false, false));
            assert!(!model_fast_path(&Device::Cpu, DType::F32, backend, false, false));
        }
    }

    #[test]
    fn cudnn_covers_causal_self_attention_of_auto_and_fused_only() {
        let spec = |backend, window_left| FlashSpec {
            causal: true,
            window_left,
            softmax_scale: 0.125,
            backend,
        };
        for backend in [AttnBackend::Auto, AttnBackend::Fused] {
            assert!(cudnn_covers(&spec(backend, None), 128, 128, false));
            // A negative window means none.
            assert!(cudnn_covers(&spec(backend, Some(-1)), 128, 128, false));
            assert!(!cudnn_covers(&spec(backend, Some(40)), 128, 128, false), "window");
            assert!(!cudnn_covers(&spec(backend, None), 128, 128, true), "packed");
            assert!(!cudnn_covers(&spec(backend, None), 1, 128, false), "KV cache");
            let not_causal = FlashSpec { causal: false, ..spec(backend, None) };
            assert!(!cudnn_covers(&not_causal, 128, 128, false), "not causal");
        }
        for backend in [AttnBackend::Flash, AttnBackend::Unfused, AttnBackend::Local] {
            assert!(!cudnn_covers(&spec(backend, None), 128, 128, false), "{backend:?}");
        }
    }

    #[test]
    fn cu_seqlens_validation() {
        assert!(check_cu_seqlens(&[0, 3, 3, 10]).is_ok());
        assert!(check_cu_seqlens(&[0]).is_err());
        assert!(check_cu_seqlens(&[1, 4]).is_err());
        assert!(check_cu_seqlens(&[0, 5, 4]).is_err());
    }

    #[test]
    fn packed_rows_validation() {
        // Two rows of 5: boundaries at 0, 5 (row start) and 10, with zero-length padding.
        assert!(check_packed_rows(&[0, 3, 5, 5, 8, 10, 10], 2, 5).is_ok());
        let e = check_packed_rows(&[0, 3, 7, 10], 2, 5).unwrap_err();
        assert!(e.contains("row 1 starts at token 5"), "{e}");
        let e = check_packed_rows(&[0, 3, 5, 9], 2, 5).unwrap_err();
        assert!(e.contains("end at token 9") && e.contains("10 tokens"), "{e}");
        assert!(check_packed_rows(&[2, 5], 1, 5).unwrap_err().contains("start at 0"));
        let p = PackedSeqs::new(&[0, 3, 5, 5, 8, 10], 2, 5, &Device::Cpu).unwrap();
        assert_eq!((p.rows(), p.seq(), p.max_seqlen()), (2, 5, 3));
        assert_eq!(p.device_offsets().to_vec1::<u32>().unwrap(), p.offsets());
    }

    #[test]
    fn window_argument() {
        let s = |w| FlashSpec {
            causal: true,
            window_left: w,
            softmax_scale: 1.0,
            backend: AttnBackend::Auto,
        };
        assert_eq!(s(None).kernel_window(), -1);
        assert_eq!(s(Some(-1)).kernel_window(), -1);
        assert_eq!(s(Some(0)).kernel_window(), 0);
        assert_eq!(s(Some(255)).kernel_window(), 255);
    }
}
