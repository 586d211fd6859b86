//! Embedding backward on CUDA: one f32 atomic add per (token, channel) into a `[vocab, h]`
//! gradient. candle's `index_add` (the autograd path) walks all tokens serially per channel;
//! this is one block per token.

use super::{contiguous_view, cuda_storage, dptr, dtype_suffix};
use crate::with_float_type;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Result, Tensor};

crate::kernel_module!(MODULE, "embedding");

/// f32 `[vocab, h]` gradient of `W[ids]` for the output gradient `dy` `[n, h]` and u32 `ids`
/// `[n]` (checked in range by the caller).
pub fn embedding_backward(ids: &Tensor, dy: &Tensor, vocab: usize) -> Result<Tensor> {
    let dw = Tensor::zeros((vocab, dy.dim(1)?), DType::F32, dy.device())?;
    embedding_backward_into(ids, dy, &dw)?;
    Ok(dw)
}

/// Adds the gradient of `W[ids]` into `dw` (contiguous f32 `[vocab, h]`, a tensor of the
/// caller's own: it is written in place), e.g. a tied output layer's weight gradient.
pub fn embedding_backward_into(ids: &Tensor, dy: &Tensor, dw: &Tensor) -> Result<()> {
    let (_, h) = dw.dims2()?;
    if dw.dtype() != DType::F32 || !dw.is_contiguous() || dy.dim(1)? != h {
        candle_core::bail!(
            "embedding backward: cannot add dy {:?} into {:?} {:?}",
            dy.dims(),
            dw.dtype(),
            dw.dims()
        );
    }
    let dev = dw.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let (sw, lw) = dw.storage_and_layout();
    let (p, _guard) = dptr(cuda_storage(&sw, "embedding grad")?, &stream, lw.start_offset())?;
    scatter_add(&dev, ids, dy, p)
}

/// Launches the scatter-add of `dy` rows into the f32 gradient at device address `dw`.
fn scatter_add(dev: &CudaDevice, ids: &Tensor, dy: &Tensor, dw: u64) -> Result<()> {
    let (n, h) = dy.dims2()?;
    if ids.dims() != [n] || ids.dtype() != DType::U32 {
        candle_core::bail!(
            "embedding backward: ids {:?} {:?} for dy {:?}",
            ids.dims(),
            ids.dtype(),
            dy.dims()
        );
    }
    let f =
        crate::function!(dev, &MODULE, &format!("embedding_bwd_{}", dtype_suffix(dy.dtype())?))?;
    let (gs, gl) = dy.storage_and_layout();
    let (is, il) = ids.storage_and_layout();
    let ids_v = contiguous_view::<u32>(cuda_storage(&is, "ids")?, il, "embedding ids")?;
    let hi = h as i32;
    let cfg =
        LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    with_float_type!(dy.dtype(), T, {
        let g = contiguous_view::<T>(cuda_storage(&gs, "dy")?, gl, "embedding dy")?;
        let mut b = f.builder();
        b.arg(&g).arg(&ids_v).arg(&dw).arg(&hi);
        // SAFETY: argument list matches `embedding_bwd_*` in kernels/embedding.cu; every id
        // is < vocab (checked by the model before the forward) and `dw` holds vocab rows of h.
        unsafe { b.launch(cfg) }.w()?;
    });
    Ok(())
}
