//! RoPE inside the fused QKV buffer (`kernels/rope_qkv.cu`): the forward rotates the query
//! and key heads of `linear_qkv`'s output in place, so attention reads q, k, v as views of one
//! buffer that the backward keeps. The flash backward writes dQKV in the same layout
//! (`cuda::flash_attn::backward_to_qkv`) and the backward here rotates its q and k parts back
//! in place. Together they replace, per layer, two rope calls on strided views, their
//! recomputation in the backward, two inverse rotations and the copies that put dq, dk, dv
//! back into the per-group layout. For cuDNN's attention, which needs evenly strided query
//! heads, the query heads can go through a separate dense buffer instead
//! ([`rope_qkv_dense_q`]).

use super::{contiguous_view, cuda_storage, dtype_suffix};
use crate::with_float_type;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Result, Tensor};

crate::kernel_module!(MODULE, "rope_qkv");

/// Head layout of the fused QKV buffer.
#[derive(Debug, Clone, Copy)]
pub struct QkvLayout {
    pub groups: usize,
    /// Query heads per group.
    pub hpg: usize,
    pub head_dim: usize,
}

/// Checks cos/sin `[cb, 1, s, rot]` against `b` rows of `s` tokens; returns `(rot, cb)`.
fn rope_dims(cos: &Tensor, sin: &Tensor, b: usize, s: usize, d: usize) -> Result<(usize, usize)> {
    let (cb, one, cs, rot) = cos.dims4()?;
    if one != 1
        || cs != s
        || (cb != 1 && cb != b)
        || rot > d
        || rot % 2 != 0
        || sin.dims() != cos.dims()
    {
        candle_core::bail!(
            "rope-qkv: cos {:?} / sin {:?} for {b}×{s} tokens",
            cos.dims(),
            sin.dims()
        );
    }
    Ok((rot, cb))
}

/// The kernels' grid: 256-thread blocks over every (token, rotated pair group) work item, at
/// most 65535 blocks (the kernels stride over the rest).
fn cfg(l: &QkvLayout, tokens: usize, rot: usize, dtype: candle_core::DType) -> LaunchConfig {
    // The kernel's vector width (it falls back to single elements on unaligned buffers, which
    // the grid-stride loop covers with fewer blocks).
    let vec = 16 / dtype.size_in_bytes();
    let width =
        if (rot / 2).is_multiple_of(vec) && l.head_dim.is_multiple_of(vec) { vec } else { 1 };
    let items = tokens * l.groups * (l.hpg + 1) * (rot / 2 / width).max(1);
    LaunchConfig {
        grid_dim: (super::elementwise_blocks(items, 256).clamp(1, 65_535), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rotates the q and k heads of `qkv` `[b, s, groups·(hpg+2)·d]` (contiguous, this call's
/// own buffer: it is written in place) by `cos`/`sin`.
pub fn rope_qkv_inplace(qkv: &Tensor, cos: &Tensor, sin: &Tensor, l: QkvLayout) -> Result<()> {
    launch(qkv, None, cos, sin, l, "fwd")
}

/// The backward of [`rope_qkv_inplace`] over `dqkv` (the gradient in the same fused layout,
/// this call's own buffer): its q and k parts are rotated back in place (the transposed
/// rotation); the v part is left as it is. After [`rope_qkv_dense_q`], `dq` `[b, s, heads, d]`
/// is rotated back into the query slots instead.
pub fn rope_qkv_backward(
    dqkv: &Tensor,
    dq: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    l: QkvLayout,
) -> Result<()> {
    launch(dqkv, dq, cos, sin, l, "bwd")
}

/// [`rope_qkv_inplace`] with the rotated query heads written to a new dense `[b, s, heads, d]`
/// buffer, which is returned (the key heads are rotated in place, the fused buffer's query
/// slots are left unrotated): what cuDNN's attention reads without a copy. Full rotary only.
pub fn rope_qkv_dense_q(qkv: &Tensor, cos: &Tensor, sin: &Tensor, l: QkvLayout) -> Result<Tensor> {
    let (b, s, _) = qkv.dims3()?;
    let heads = l.groups * l.hpg;
    let dev = qkv.device().as_cuda_device()?.clone();
    let q = with_float_type!(qkv.dtype(), T, {
        // SAFETY: every element is written by the kernel below (full rotary, checked there).
        let slice = unsafe { dev.alloc::<T>(b * s * heads * l.head_dim)? };
        super::wrap(slice, &dev, (b, s, heads, l.head_dim))
    });
    launch(qkv, Some(&q), cos, sin, l, "fwd")?;
    Ok(q)
}

fn launch(
    qkv: &Tensor,
    dense_q: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    l: QkvLayout,
    direction: &str,
) -> Result<()> {
    let (b, s, rows) = qkv.dims3()?;
    if rows != l.groups * (l.hpg + 2) * l.head_dim || !qkv.is_contiguous() {
        candle_core::bail!("rope-qkv: qkv {:?} does not hold {l:?} contiguously", qkv.dims());
    }
    let (rot, cb) = rope_dims(cos, sin, b, s, l.head_dim)?;
    if let Some(q) = dense_q {
        let want = [b, s, l.groups * l.hpg, l.head_dim];
        if q.dims() != want || !q.is_contiguous() || q.dtype() != qkv.dtype() {
            candle_core::bail!(
                "rope-qkv: dense q {:?} {:?} (expected contiguous {want:?} {:?})",
                q.dims(),
                q.dtype(),
                qkv.dtype()
            );
        }
        // The kernel leaves a head's columns past `rot` alone: with a separate query buffer
        // they would be missing there.
        if rot != l.head_dim {
            candle_core::bail!("rope-qkv: a dense q needs full rotary ({rot} of {})", l.head_dim);
        }
    }
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let dev = qkv.device().as_cuda_device()?.clone();
    let name = format!("rope_qkv_{direction}_{}", dtype_suffix(qkv.dtype())?);
    let f = crate::function!(&dev, &MODULE, &name)?;
    let (xs, xl) = qkv.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    let dense = dense_q.map(Tensor::storage_and_layout);
    let ints = [b, s, l.groups, l.hpg, l.head_dim, rot, cb].map(|v| v as i32);
    with_float_type!(qkv.dtype(), T, {
        let x = contiguous_view::<T>(cuda_storage(&xs, "qkv")?, xl, "rope-qkv qkv")?;
        let qd = match &dense {
            Some((qs, ql)) => {
                Some(contiguous_view::<T>(cuda_storage(qs, "dense q")?, ql, "rope-qkv q")?)
            }
            None => None,
        };
        let c = contiguous_view::<T>(cuda_storage(&cs, "cos")?, cl, "rope-qkv cos")?;
        let sn = contiguous_view::<T>(cuda_storage(&ss, "sin")?, sl, "rope-qkv sin")?;
        let null = 0u64;
        let mut bld = f.builder();
        bld.arg(&x);
        match &qd {
            Some(v) => bld.arg(v),
            None => bld.arg(&null),
        };
        bld.arg(&c).arg(&sn);
        for v in &ints {
            bld.arg(v);
        }
        // SAFETY: argument list matches `rope_qkv_{fwd,bwd}_*` (a null dense query buffer
        // means the query heads in place); the kernel writes `qkv` (and the dense q) in
        // place, each rotated pair by the one thread that read it, and the caller owns them.
        unsafe { bld.launch(cfg(&l, b * s, rot, qkv.dtype())) }.w()?;
    });
    Ok(())
}
