//! Fused RMSNorm (forward and backward) for rows of a contiguous tensor; semantics of
//! [`crate::ops::norm::rms_norm`], including zero-centered gamma.

use super::{contiguous_view, cuda_storage, dtype_suffix, wrap};
use crate::with_float_type;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

crate::kernel_module!(MODULE, "rms_norm");

/// Widest row the backward handles: each block keeps an f32 dγ accumulator of the row
/// width in shared memory, which must fit the default 48 KiB.
pub const MAX_WIDTH: usize = 12 * 1024;

/// Threads per row: about eight elements each, one warp at least, 1024 at most.
fn threads_for(cols: usize) -> u32 {
    (cols / 8).next_multiple_of(32).clamp(32, 1024) as u32
}

/// `rms_norm(x, w)` over the last dim of a contiguous `x`; `w` has the row width.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub eps: f32,
    pub zero_centered: bool,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-rms-norm runs on CUDA only (CPU uses ops::norm::rms_norm)")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let cols = *xl.dims().last().unwrap_or(&0);
        if wl.dims() != [cols] || cols == 0 {
            candle_core::bail!("fused-rms-norm: weight {:?} for rows of {cols}", wl.dims());
        }
        let rows = xl.shape().elem_count() / cols;
        let dev = xs.device().clone();
        let f = crate::function!(
            &dev,
            &MODULE,
            &format!("rms_norm_fwd_{}", dtype_suffix(xs.dtype())?)
        )?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads_for(cols), 1, 1),
            shared_mem_bytes: 0,
        };
        let (eps, zc, c) = (self.eps, i32::from(self.zero_centered), cols as i32);
        let out = with_float_type!(xs.dtype(), T, {
            let x = contiguous_view::<T>(xs, xl, "fused-rms-norm x")?;
            let w = contiguous_view::<T>(ws, wl, "fused-rms-norm weight")?;
            // SAFETY: written entirely by the kernel below.
            let y = unsafe { dev.alloc::<T>(rows * cols)? };
            let mut b = f.builder();
            b.arg(&x).arg(&w).arg(&y).arg(&c).arg(&eps).arg(&zc);
            // SAFETY: argument list matches `rms_norm_fwd_*` in kernels/rms_norm.cu.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, &dy.contiguous()?, self.eps, self.zero_centered)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(dx, dw)` of RMSNorm for contiguous `x`, `dy` `[.., cols]` and `w` `[cols]`.
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    zero_centered: bool,
) -> Result<(Tensor, Tensor)> {
    let cols = x.dim(candle_core::D::Minus1)?;
    if cols > MAX_WIDTH {
        candle_core::bail!("fused-rms-norm backward: rows of {cols} exceed {MAX_WIDTH}");
    }
    let rows = x.elem_count() / cols;
    let dtype = x.dtype();
    let dev = x.device().as_cuda_device()?.clone();
    let sfx = dtype_suffix(dtype)?;
    let bwd = crate::function!(&dev, &MODULE, &format!("rms_norm_bwd_{sfx}"))?;
    let red = crate::function!(&dev, &MODULE, &format!("rms_norm_dw_{sfx}"))?;
    // Enough blocks to fill the GPU; each walks rows with a grid stride.
    let blocks = rows.clamp(1, 1024);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (xs, ws, gs) = (cuda_storage(&xs, "x")?, cuda_storage(&ws, "w")?, cuda_storage(&gs, "dy")?);
    let (r, c, nb, zc) = (rows as i32, cols as i32, blocks as i32, i32::from(zero_centered));
    with_float_type!(dtype, T, {
        let xv = contiguous_view::<T>(xs, xl, "rms-norm bwd x")?;
        let wv = contiguous_view::<T>(ws, wl, "rms-norm bwd w")?;
        let gv = contiguous_view::<T>(gs, gl, "rms-norm bwd dy")?;
        // SAFETY: all three buffers are fully written by the kernels below.
        let dx = unsafe { dev.alloc::<T>(rows * cols)? };
        let partial = unsafe { dev.alloc::<f32>(blocks * cols)? };
        let dw = unsafe { dev.alloc::<T>(cols)? };
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads_for(cols), 1, 1),
            shared_mem_bytes: (cols * 4) as u32,
        };
        let mut b = bwd.builder();
        b.arg(&xv).arg(&wv).arg(&gv).arg(&dx).arg(&partial).arg(&r).arg(&c).arg(&eps).arg(&zc);
        // SAFETY: argument list matches `rms_norm_bwd_*`.
        unsafe { b.launch(cfg) }.w()?;
        let cfg = LaunchConfig {
            grid_dim: (super::div_ceil(cols, 256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = red.builder();
        b.arg(&partial).arg(&dw).arg(&nb).arg(&c);
        // SAFETY: argument list matches `rms_norm_dw_*`.
        unsafe { b.launch(cfg) }.w()?;
        Ok((wrap(dx, &dev, x.shape().clone()), wrap(dw, &dev, cols)))
    })
}
