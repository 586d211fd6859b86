//! `a + b` for contiguous same-shape tensors with 16-byte vector accesses (`kernels/add.cu`):
//! the transformer blocks' residual adds, which candle's element-at-a-time add ran at about a
//! third of the memory bandwidth.

use super::{contiguous_view, cuda_storage, dtype_suffix, elementwise_blocks, wrap};
use crate::with_float_type;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Result, Tensor};

crate::kernel_module!(MODULE, "add");

/// `a + b`; both contiguous with the same shape and dtype (f32, bf16 or f16) on one GPU.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "fused add: {:?} {:?} + {:?} {:?}",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        );
    }
    let n = a.elem_count();
    let dev = a.device().as_cuda_device()?.clone();
    let func = crate::function!(&dev, &MODULE, &format!("add_{}", dtype_suffix(a.dtype())?))?;
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (sa, sb) = (cuda_storage(&sa, "a")?, cuda_storage(&sb, "b")?);
    // Eight elements per thread in the vectorized loop (four for f32).
    let cfg = LaunchConfig {
        grid_dim: (elementwise_blocks(n.div_ceil(8), 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let len = n as u64;
    with_float_type!(a.dtype(), T, {
        let av = contiguous_view::<T>(sa, la, "fused add a")?;
        let bv = contiguous_view::<T>(sb, lb, "fused add b")?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let mut builder = func.builder();
        builder.arg(&av).arg(&bv).arg(&y).arg(&len);
        // SAFETY: argument list matches `add_*` in kernels/add.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(wrap(y, &dev, a.shape().clone()))
    })
}
