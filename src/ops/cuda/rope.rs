//! Fused rotary embedding (non-interleaved, partial rotary) for `x` `[b, heads, s, d]` of any
//! strides with `cos`/`sin` `[b or 1, 1, s, rot]`; semantics of [`crate::ops::rope::apply_rope`].
//! The output is contiguous; reading strided input saves the copy of q/k out of the fused QKV.

use super::{contiguous_view, cuda_storage, dtype_suffix, elementwise_blocks};
use crate::with_float_type;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

crate::kernel_module!(MODULE, "rope");

/// `apply_rope(x, cos, sin)`; cos/sin carry no gradient (they are functions of positions).
#[derive(Debug, Clone, Copy)]
pub struct Rope;

/// Checks shapes and returns `(b, h, s, d, rot, cos_batches)`.
fn dims(
    xl: &Layout,
    cl: &Layout,
    sl: &Layout,
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, h, s, d) = xl.shape().dims4()?;
    let (cb, one, cs, rot) = cl.shape().dims4()?;
    if one != 1
        || cs != s
        || (cb != 1 && cb != b)
        || rot > d
        || rot % 2 != 0
        || sl.dims() != cl.dims()
    {
        candle_core::bail!(
            "fused-rope: x {:?} with cos {:?} / sin {:?}",
            xl.dims(),
            cl.dims(),
            sl.dims()
        );
    }
    Ok((b, h, s, d, rot, cb))
}

/// Launches the kernel (`inverse` = backward) on `x` of layout `xl`.
#[allow(clippy::too_many_arguments)]
fn launch(
    dev: &CudaDevice,
    xs: &CudaStorage,
    xl: &Layout,
    cs: &CudaStorage,
    cl: &Layout,
    ss: &CudaStorage,
    sl: &Layout,
    inverse: bool,
) -> Result<CudaStorage> {
    let (b, h, s, d, rot, cb) = dims(xl, cl, sl)?;
    let f = crate::function!(dev, &MODULE, &format!("rope_{}", dtype_suffix(xs.dtype())?))?;
    let n = b * h * s * d;
    let cfg = LaunchConfig {
        grid_dim: (elementwise_blocks(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let st: Vec<i64> = xl.stride().iter().map(|&v| v as i64).collect();
    let (bi, hi, si, di, ri, cbi) = (b as i32, h as i32, s as i32, d as i32, rot as i32, cb as i32);
    let inv = i32::from(inverse);
    Ok(with_float_type!(xs.dtype(), T, {
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let c = contiguous_view::<T>(cs, cl, "fused-rope cos")?;
        let sn = contiguous_view::<T>(ss, sl, "fused-rope sin")?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let mut bld = f.builder();
        bld.arg(&x).arg(&c).arg(&sn).arg(&out);
        bld.arg(&bi).arg(&hi).arg(&si).arg(&di).arg(&ri).arg(&cbi);
        bld.arg(&st[0]).arg(&st[1]).arg(&st[2]).arg(&st[3]).arg(&inv);
        // SAFETY: argument list matches `rope_*` in kernels/rope.cu.
        unsafe { bld.launch(cfg) }.w()?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    }))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused-rope runs on CUDA only (CPU uses ops::rope::apply_rope)")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = launch(xs.device(), xs, xl, cs, cl, ss, sl, false)?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = dy.device().as_cuda_device()?.clone();
        let (gs, gl) = dy.storage_and_layout();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let out = launch(
            &dev,
            cuda_storage(&gs, "rope dy")?,
            gl,
            cuda_storage(&cs, "rope cos")?,
            cl,
            cuda_storage(&ss, "rope sin")?,
            sl,
            true,
        )?;
        let dx = Tensor::from_storage(
            candle_core::Storage::Cuda(out),
            dy.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        );
        Ok((Some(dx), None, None))
    }
}
