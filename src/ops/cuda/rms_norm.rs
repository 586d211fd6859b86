//! Fused RMSNorm (forward and backward) for rows of a contiguous tensor; semantics of
//! [`crate::ops::norm::rms_norm`], including zero-centered gamma.

use super::{contiguous_view, cuda_storage, dtype_suffix, wrap};
use crate::with_float_type;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

crate::kernel_module!(MODULE, "rms_norm");

/// Widest row the scalar backward handles: each block keeps an f32 dγ accumulator of the
/// row width in shared memory, which must fit the default 48 KiB. (The vectorized kernels
/// keep it in registers and take rows up to [`MAX_VECTORS`] vectors per thread.)
pub const MAX_WIDTH: usize = 12 * 1024;

/// Most 16-byte vectors one thread of a vectorized kernel keeps (`_v1`, `_v2`, `_v4`).
const MAX_VECTORS: usize = 4;

/// Threads per row: about eight elements each, one warp at least, 1024 at most.
fn threads_for(cols: usize) -> u32 {
    (cols / 8).next_multiple_of(32).clamp(32, 1024) as u32
}

/// Whether the fused kernels take rows of `cols` elements of `dtype`: any width up to
/// [`MAX_WIDTH`], wider ones as whole 16-byte vectors (the vectorized kernels; a row-aligned
/// view of such rows is always 16-byte aligned).
pub fn supports_width(cols: usize, dtype: candle_core::DType) -> bool {
    cols <= MAX_WIDTH || vector_launch(cols, dtype.size_in_bytes(), &[0], BWD_THREADS).is_some()
}

/// Most threads per block of the vectorized forward and backward kernels (their
/// `__launch_bounds__` in `kernels/rms_norm.cu`).
const FWD_THREADS: usize = 1024;
const BWD_THREADS: usize = 512;

/// The vectorized launch for rows of `cols` elements of `elem` bytes whose buffers start at
/// these element offsets, with at most `max_threads` per block: (kernel-name suffix, threads
/// per block), or None when a row is not a whole number of 16-byte vectors, a buffer is not
/// 16-byte aligned, or the row is too wide.
fn vector_launch(
    cols: usize,
    elem: usize,
    offsets: &[usize],
    max_threads: usize,
) -> Option<(&'static str, u32)> {
    let per_vec = 16 / elem;
    if !cols.is_multiple_of(per_vec) || offsets.iter().any(|o| !(o * elem).is_multiple_of(16)) {
        return None;
    }
    let nvec = cols / per_vec;
    let threads = nvec.next_multiple_of(32).clamp(32, max_threads);
    match nvec.div_ceil(threads) {
        1 => Some(("_v1", threads as u32)),
        2 => Some(("_v2", threads as u32)),
        n if n <= MAX_VECTORS => Some(("_v4", threads as u32)),
        _ => None,
    }
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
        let offsets = [xl.start_offset(), wl.start_offset()];
        let (vec, threads) = vector_launch(cols, xs.dtype().size_in_bytes(), &offsets, FWD_THREADS)
            .unwrap_or(("", threads_for(cols)));
        let f = crate::function!(
            &dev,
            &MODULE,
            &format!("rms_norm_fwd_{}{vec}", dtype_suffix(xs.dtype())?)
        )?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
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
        let (dx, dw) =
            rms_norm_backward(x, w, &dy.contiguous()?, None, self.eps, self.zero_centered)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(dx, dw)` of RMSNorm for contiguous `x`, `dy` `[.., cols]` and `w` `[cols]`; with
/// `residual` (contiguous, shaped like `x`), `dx + residual` in the same pass (the gradient
/// of a pre-norm block's input, whose skip connection carries `residual`).
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    residual: Option<&Tensor>,
    eps: f32,
    zero_centered: bool,
) -> Result<(Tensor, Tensor)> {
    let cols = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / cols;
    let dtype = x.dtype();
    if let Some(r) = residual {
        if r.dims() != x.dims() || r.dtype() != dtype {
            candle_core::bail!(
                "fused-rms-norm backward: residual {:?} {:?} for x {:?} {dtype:?}",
                r.dims(),
                r.dtype(),
                x.dims()
            );
        }
    }
    let offsets: Vec<usize> =
        [x, w, dy].into_iter().chain(residual).map(|t| t.layout().start_offset()).collect();
    let vector = vector_launch(cols, dtype.size_in_bytes(), &offsets, BWD_THREADS);
    if vector.is_none() && cols > MAX_WIDTH {
        candle_core::bail!("fused-rms-norm backward: rows of {cols} exceed {MAX_WIDTH}");
    }
    let dev = x.device().as_cuda_device()?.clone();
    let sfx = dtype_suffix(dtype)?;
    let (vec, threads, smem) = match vector {
        Some((vec, threads)) => (vec, threads, 0),
        None => ("", threads_for(cols), (cols * 4) as u32),
    };
    let bwd = crate::function!(&dev, &MODULE, &format!("rms_norm_bwd_{sfx}{vec}"))?;
    let red = crate::function!(&dev, &MODULE, &format!("rms_norm_dw_{sfx}"))?;
    // Enough blocks to fill the GPU; each walks rows with a grid stride. Fewer for the
    // vectorized kernels: their blocks are wider and each writes a row of dγ partials.
    let blocks = rows.clamp(1, if vector.is_some() { 512 } else { 1024 });
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let res = residual.map(Tensor::storage_and_layout);
    let (xs, ws, gs) = (cuda_storage(&xs, "x")?, cuda_storage(&ws, "w")?, cuda_storage(&gs, "dy")?);
    let (r, c, nb, zc) = (rows as i32, cols as i32, blocks as i32, i32::from(zero_centered));
    with_float_type!(dtype, T, {
        let xv = contiguous_view::<T>(xs, xl, "rms-norm bwd x")?;
        let wv = contiguous_view::<T>(ws, wl, "rms-norm bwd w")?;
        let gv = contiguous_view::<T>(gs, gl, "rms-norm bwd dy")?;
        let rv = match &res {
            Some((s, l)) => {
                Some(contiguous_view::<T>(cuda_storage(s, "residual")?, l, "rms-norm bwd res")?)
            }
            None => None,
        };
        // SAFETY: all three buffers are fully written by the kernels below.
        let dx = unsafe { dev.alloc::<T>(rows * cols)? };
        let partial = unsafe { dev.alloc::<f32>(blocks * cols)? };
        let dw = unsafe { dev.alloc::<T>(cols)? };
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        let null = 0u64;
        let mut b = bwd.builder();
        b.arg(&xv).arg(&wv).arg(&gv);
        match &rv {
            Some(rv) => b.arg(rv),
            None => b.arg(&null),
        };
        b.arg(&dx).arg(&partial).arg(&r).arg(&c).arg(&eps).arg(&zc);
        // SAFETY: argument list matches `rms_norm_bwd_*` (a null `res` adds nothing).
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

#[cfg(test)]
mod tests {
    use super::vector_launch;

    #[test]
    fn vector_launch_needs_whole_aligned_vectors_and_fits_four_per_thread() {
        // bf16 rows of 2048: 256 vectors, one per thread.
        assert_eq!(vector_launch(2048, 2, &[0, 0], 1024), Some(("_v1", 256)));
        // 16384 bf16: 2048 vectors over 1024 threads, or 4 each over 512; f32 rows of
        // 12288: 3072 vectors, the 4-vector kernel.
        assert_eq!(vector_launch(16384, 2, &[0], 1024), Some(("_v2", 1024)));
        assert_eq!(vector_launch(16384, 2, &[0], 512), Some(("_v4", 512)));
        assert_eq!(vector_launch(12288, 4, &[0], 1024), Some(("_v4", 1024)));
        assert_eq!(vector_launch(40000, 2, &[0], 1024), None);
        // Not whole vectors, or a buffer starting mid-vector: the scalar kernels.
        assert_eq!(vector_launch(2047, 2, &[0], 1024), None);
        assert_eq!(vector_launch(2048, 2, &[0, 4], 1024), None);
        assert_eq!(vector_launch(2048, 2, &[0, 2048], 1024), Some(("_v1", 256)));
    }
}
