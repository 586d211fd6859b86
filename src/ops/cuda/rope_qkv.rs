//! RoPE inside the fused QKV buffer (`kernels/rope_qkv.cu`): the forward rotates the query
//! and key heads of `linear_qkv`'s output in place, so attention reads q, k, v as views of one
//! buffer that the backward keeps; the backward writes dQKV in that layout straight from the
//! attention gradients. Together they replace, per layer, two rope calls on strided views,
//! their recomputation in the backward, two inverse rotations and the copies that put dq, dk,
//! dv back into the per-group layout.

use super::{contiguous_view, cuda_storage, dtype_suffix, wrap};
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

/// One block per token, at most 65535 blocks (the kernels stride over the rest).
fn cfg(tokens: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tokens.clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rotates the q and k heads of `qkv` `[b, s, groups·(hpg+2)·d]` (contiguous, this call's
/// own buffer: it is written in place) by `cos`/`sin`.
pub fn rope_qkv_inplace(qkv: &Tensor, cos: &Tensor, sin: &Tensor, l: QkvLayout) -> Result<()> {
    let (b, s, rows) = qkv.dims3()?;
    if rows != l.groups * (l.hpg + 2) * l.head_dim || !qkv.is_contiguous() {
        candle_core::bail!("rope-qkv: qkv {:?} does not hold {l:?} contiguously", qkv.dims());
    }
    let (rot, cb) = rope_dims(cos, sin, b, s, l.head_dim)?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let dev = qkv.device().as_cuda_device()?.clone();
    let f =
        crate::function!(&dev, &MODULE, &format!("rope_qkv_fwd_{}", dtype_suffix(qkv.dtype())?))?;
    let (xs, xl) = qkv.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    let ints = [b, s, l.groups, l.hpg, l.head_dim, rot, cb].map(|v| v as i32);
    with_float_type!(qkv.dtype(), T, {
        let x = contiguous_view::<T>(cuda_storage(&xs, "qkv")?, xl, "rope-qkv qkv")?;
        let c = contiguous_view::<T>(cuda_storage(&cs, "cos")?, cl, "rope-qkv cos")?;
        let sn = contiguous_view::<T>(cuda_storage(&ss, "sin")?, sl, "rope-qkv sin")?;
        let mut bld = f.builder();
        bld.arg(&x).arg(&c).arg(&sn);
        for v in &ints {
            bld.arg(v);
        }
        // SAFETY: argument list matches `rope_qkv_fwd_*`; the kernel writes `qkv` in place,
        // each rotated pair by the one thread that read it, and the caller owns the buffer.
        unsafe { bld.launch(cfg(b * s)) }.w()?;
    });
    Ok(())
}

/// dQKV `[b, s, groups·(hpg+2)·d]` from `dq` `[b, heads, s, d]` and `dk`/`dv` `[b, groups, s,
/// d]` (any strides with a dense last dim): q and k parts rotated back by `cos`/`sin`.
pub fn rope_qkv_backward(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    l: QkvLayout,
) -> Result<Tensor> {
    let (b, heads, s, d) = dq.dims4()?;
    if heads != l.groups * l.hpg
        || d != l.head_dim
        || dk.dims() != [b, l.groups, s, d]
        || dv.dims() != dk.dims()
    {
        candle_core::bail!(
            "rope-qkv backward: dq {:?} dk {:?} dv {:?} for {l:?}",
            dq.dims(),
            dk.dims(),
            dv.dims()
        );
    }
    let (rot, cb) = rope_dims(cos, sin, b, s, d)?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let dense = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[3] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (dq, dk, dv) = (dense(dq)?, dense(dk)?, dense(dv)?);
    // (batch, token, head) element strides of a [b, h, s, d] view.
    let strides = |t: &Tensor| -> [i64; 3] {
        let st = t.stride();
        [st[0] as i64, st[2] as i64, st[1] as i64]
    };
    let (qs, ks, vs) = (strides(&dq), strides(&dk), strides(&dv));
    let dev = dq.device().as_cuda_device()?.clone();
    let f =
        crate::function!(&dev, &MODULE, &format!("rope_qkv_bwd_{}", dtype_suffix(dq.dtype())?))?;
    let rows = l.groups * (l.hpg + 2) * d;
    let ints = [b, s, l.groups, l.hpg, d, rot, cb].map(|v| v as i32);
    let (gq, lq) = dq.storage_and_layout();
    let (gk, lk) = dk.storage_and_layout();
    let (gv, lv) = dv.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    with_float_type!(dq.dtype(), T, {
        let view = |st, lay: &candle_core::Layout, what| -> Result<_> {
            let s = cuda_storage(st, what)?;
            Ok(s.as_cuda_slice::<T>()?.slice(lay.start_offset()..))
        };
        let (q, k, v) = (view(&gq, lq, "dq")?, view(&gk, lk, "dk")?, view(&gv, lv, "dv")?);
        let c = contiguous_view::<T>(cuda_storage(&cs, "cos")?, cl, "rope-qkv cos")?;
        let sn = contiguous_view::<T>(cuda_storage(&ss, "sin")?, sl, "rope-qkv sin")?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(b * s * rows)? };
        let mut bld = f.builder();
        bld.arg(&q).arg(&k).arg(&v).arg(&c).arg(&sn).arg(&out);
        for v in &ints {
            bld.arg(v);
        }
        for v in qs.iter().chain(&ks).chain(&vs) {
            bld.arg(v);
        }
        // SAFETY: argument list matches `rope_qkv_bwd_*`; the strides address elements of
        // the three gradient views.
        unsafe { bld.launch(cfg(b * s)) }.w()?;
        Ok(wrap(out, &dev, (b, s, rows)))
    })
}
