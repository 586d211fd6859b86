//! Fused token cross-entropy over the vocabulary, read straight from half-precision logits:
//! the forward makes one online-softmax pass per row and keeps only `(loss, lse)` per token in
//! f32; the backward writes `(softmax − onehot)·dloss` directly in the logits' dtype. Neither
//! direction materializes an f32 copy of the `[tokens, vocab]` logits (the composite path
//! holds several). Semantics of [`crate::ops::cross_entropy::token_cross_entropy_composite`].

use super::{contiguous_view, cuda_storage, dtype_suffix, wrap};
use crate::with_float_type;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

crate::kernel_module!(MODULE, "cross_entropy");

const THREADS: u32 = 512;

/// `logits [N, V]`, `labels [N]` (u32) → `[N, 2]` f32 of `(lse − logit[label], lse)`.
/// The lse column is what the backward needs; callers use column 0.
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropy;

fn dims(ll: &Layout, tl: &Layout) -> Result<(usize, usize)> {
    let (n, v) = ll.shape().dims2()?;
    if tl.dims() != [n] {
        candle_core::bail!(
            "fused-cross-entropy: labels {:?} for logits {:?}",
            tl.dims(),
            ll.dims()
        );
    }
    if v > i32::MAX as usize {
        candle_core::bail!("fused-cross-entropy: vocabulary of {v} is too large");
    }
    Ok((n, v))
}

fn row_cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-cross-entropy runs on CUDA only (CPU uses ops::cross_entropy)")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ts: &CudaStorage,
        tl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, v) = dims(xl, tl)?;
        let dev = xs.device().clone();
        let f = crate::function!(&dev, &MODULE, &format!("ce_fwd_{}", dtype_suffix(xs.dtype())?))?;
        let labels = contiguous_view::<u32>(ts, tl, "fused-cross-entropy labels")?;
        let vi = v as i32;
        // SAFETY: both columns of every row are written by the kernel.
        let out = unsafe { dev.alloc::<f32>(2 * n)? };
        with_float_type!(xs.dtype(), T, {
            let x = contiguous_view::<T>(xs, xl, "fused-cross-entropy logits")?;
            let mut b = f.builder();
            b.arg(&x).arg(&labels).arg(&out).arg(&vi);
            // SAFETY: argument list matches `ce_fwd_*` in kernels/cross_entropy.cu.
            unsafe { b.launch(row_cfg(n)) }.w()?;
        });
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        labels: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(backward(x, labels, res, g, false)?), None))
    }
}

/// The backward of [`CrossEntropy`] written over the logits themselves: `logits` `[N, V]`
/// becomes `(softmax − onehot)·g_loss + softmax·g_lse` per row (`g` `[N, 2]` f32, `res` the
/// forward's `[N, 2]`). Saves the `[N, V]` gradient buffer, the largest allocation of a step.
/// The caller hands over `logits` and must hold no other clone of it.
pub fn backward_in_place(
    logits: Tensor,
    labels: &Tensor,
    res: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    if !logits.is_contiguous() || logits.layout().start_offset() != 0 {
        candle_core::bail!("fused-cross-entropy in-place backward needs contiguous logits");
    }
    backward(&logits, labels, res, g, true)?;
    Ok(logits)
}

/// The logits' gradient, into a new tensor or (`in_place`) over `x` itself, in which case the
/// returned tensor is `x`.
fn backward(
    x: &Tensor,
    labels: &Tensor,
    res: &Tensor,
    g: &Tensor,
    in_place: bool,
) -> Result<Tensor> {
    let g = g.contiguous()?;
    let (n, v) = x.dims2()?;
    let dev = x.device().as_cuda_device()?.clone();
    let f = crate::function!(&dev, &MODULE, &format!("ce_bwd_{}", dtype_suffix(x.dtype())?))?;
    let (xs, xl) = x.storage_and_layout();
    let (ts, tl) = labels.storage_and_layout();
    let (rs, rl) = res.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let labels_v = contiguous_view::<u32>(cuda_storage(&ts, "labels")?, tl, "ce labels")?;
    let res_v = contiguous_view::<f32>(cuda_storage(&rs, "ce res")?, rl, "ce res")?;
    let g_v = contiguous_view::<f32>(cuda_storage(&gs, "ce grad")?, gl, "ce grad")?;
    let xs = cuda_storage(&xs, "logits")?;
    let vi = v as i32;
    with_float_type!(x.dtype(), T, {
        let xv = contiguous_view::<T>(xs, xl, "ce logits")?;
        let mut b = f.builder();
        b.arg(&xv).arg(&labels_v).arg(&res_v).arg(&g_v);
        if in_place {
            // Input and output are the same buffer: each element is read, then written, by
            // the same thread.
            b.arg(&xv).arg(&vi);
            // SAFETY: argument list matches `ce_bwd_*`; the aliasing is per element (above)
            // and the caller owns the only reference to `x`.
            unsafe { b.launch(row_cfg(n)) }.w()?;
            Ok(x.clone())
        } else {
            // SAFETY: every element is written by the kernel.
            let dx = unsafe { dev.alloc::<T>(n * v)? };
            b.arg(&dx).arg(&vi);
            // SAFETY: argument list matches `ce_bwd_*`.
            unsafe { b.launch(row_cfg(n)) }.w()?;
            Ok(wrap(dx, &dev, (n, v)))
        }
    })
}
