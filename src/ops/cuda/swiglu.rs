//! Fused SwiGLU on the `[.., 2f]` output of a gated `linear_fc1` laid out `[gate; up]`;
//! semantics of [`crate::ops::activation::swiglu`]. The backward writes `d[gate; up]` in one
//! pass instead of the composite's narrow/mul/silu-backward/cat chain.

use super::{contiguous_view, cuda_storage, dtype_suffix, elementwise_blocks, wrap};
use crate::with_float_type;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
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

/// The launch over `n` output columns; with an amax, at most 2048 blocks, so that their
/// atomic maxima on one address stay few.
fn cfg(n: usize, amax: bool) -> LaunchConfig {
    let blocks = elementwise_blocks(n, 256);
    LaunchConfig {
        grid_dim: (if amax { blocks.min(2048) } else { blocks }, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The forward `silu(x[.., :f]) * x[.., f:]` and the largest magnitude of its values, from
/// the same pass (FP8 current scaling of `linear_fc2`'s input).
pub fn forward_amax(x: &Tensor) -> Result<(Tensor, CudaSlice<f32>)> {
    let op = SwiGluAmax(x.device().as_cuda_device()?.alloc_zeros::<f32>(1)?);
    let y = x.contiguous()?.apply_op1_no_bwd(&op)?;
    Ok((y, op.0))
}

/// [`SwiGlu`]'s forward folding its output's largest magnitude into the slice.
struct SwiGluAmax(CudaSlice<f32>);

impl CustomOp1 for SwiGluAmax {
    fn name(&self) -> &'static str {
        "fused-swiglu-amax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-swiglu runs on CUDA only (CPU uses ops::activation::swiglu)")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        forward(xs, xl, Some(&self.0))
    }
}

/// The backward `d[gate; up]` and its largest magnitude, from the same pass (FP8 current
/// scaling of `linear_fc1`'s output gradient).
pub fn backward_amax(x: &Tensor, dy: &Tensor) -> Result<(Tensor, CudaSlice<f32>)> {
    let amax = x.device().as_cuda_device()?.alloc_zeros::<f32>(1)?;
    let dx = backward(x, dy, Some(&amax))?;
    Ok((dx, amax))
}

/// Null for a kernel's optional amax pointer.
const NO_AMAX: u64 = 0;

fn forward(
    xs: &CudaStorage,
    xl: &Layout,
    amax: Option<&CudaSlice<f32>>,
) -> Result<(CudaStorage, Shape)> {
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
        match amax {
            Some(a) => b.arg(a),
            None => b.arg(&NO_AMAX),
        };
        // SAFETY: argument list matches `swiglu_fwd_*` in kernels/swiglu.cu.
        unsafe { b.launch(cfg(rows * f, amax.is_some())) }.w()?;
        CudaStorage::wrap_cuda_slice(y, dev.clone())
    });
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("checked non-empty") = f;
    Ok((out, Shape::from(dims)))
}

fn backward(x: &Tensor, dy: &Tensor, amax: Option<&CudaSlice<f32>>) -> Result<Tensor> {
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
        match amax {
            Some(a) => b.arg(a),
            None => b.arg(&NO_AMAX),
        };
        // SAFETY: argument list matches `swiglu_bwd_*`.
        unsafe { b.launch(cfg(rows * f, amax.is_some())) }.w()?;
        Ok(wrap(dx, &dev, x.shape().clone()))
    })
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-swiglu runs on CUDA only (CPU uses ops::activation::swiglu)")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        forward(xs, xl, None)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(backward(x, dy, None)?))
    }
}
