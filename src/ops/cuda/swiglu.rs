//! Fused SwiGLU on the `[.., 2f]` output of a gated `linear_fc1` laid out `[gate; up]`;
//! semantics of [`crate::ops::activation::swiglu`]. The backward writes `d[gate; up]` in one
//! pass instead of the composite's narrow/mul/silu-backward/cat chain.

use super::{contiguous_view, cuda_storage, dtype_suffix, elementwise_blocks, wrap};
use crate::with_float_type;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

crate::kernel_module!(MODULE, "swiglu");

/// `silu(x[.., :f]) * x[.., f:]` for contiguous `x` `[.., 2f]`.
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu;

fn split(dims: &[usize]) -> Result<(usize, usize)> {
    let last = *dims.last().unwrap_or(&0);
    if last == 0 || !last.is_multiple_of(2) {
        candle_core::bail!("fused-swiglu: last dim of {dims:?} must be even ([gate; up])");
    }
    Ok((dims.iter().product::<usize>() / last, last / 2))
}

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (elementwise_blocks(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-swiglu runs on CUDA only (CPU uses ops::activation::swiglu)")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, f) = split(xl.dims())?;
        let dev = xs.device().clone();
        let func =
            crate::function!(&dev, &MODULE, &format!("swiglu_fwd_{}", dtype_suffix(xs.dtype())?))?;
        let (r, fi) = (rows as u64, f as i32);
        let out = with_float_type!(xs.dtype(), T, {
            let x = contiguous_view::<T>(xs, xl, "fused-swiglu x")?;
            // SAFETY: every element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(rows * f)? };
            let mut b = func.builder();
            b.arg(&x).arg(&y).arg(&r).arg(&fi);
            // SAFETY: argument list matches `swiglu_fwd_*` in kernels/swiglu.cu.
            unsafe { b.launch(cfg(rows * f)) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("checked non-empty") = f;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let (rows, f) = split(x.dims())?;
        let dev = x.device().as_cuda_device()?.clone();
        let func =
            crate::function!(&dev, &MODULE, &format!("swiglu_bwd_{}", dtype_suffix(x.dtype())?))?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (xs, gs) = (cuda_storage(&xs, "swiglu x")?, cuda_storage(&gs, "swiglu dy")?);
        let (r, fi) = (rows as u64, f as i32);
        with_float_type!(x.dtype(), T, {
            let xv = contiguous_view::<T>(xs, xl, "fused-swiglu bwd x")?;
            let gv = contiguous_view::<T>(gs, gl, "fused-swiglu bwd dy")?;
            // SAFETY: every element (both halves) is written by the kernel.
            let dx = unsafe { dev.alloc::<T>(rows * 2 * f)? };
            let mut b = func.builder();
            b.arg(&xv).arg(&gv).arg(&dx).arg(&r).arg(&fi);
            // SAFETY: argument list matches `swiglu_bwd_*`.
            unsafe { b.launch(cfg(rows * f)) }.w()?;
            Ok(Some(wrap(dx, &dev, x.shape().clone())))
        })
    }
}
