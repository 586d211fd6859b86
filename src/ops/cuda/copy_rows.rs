//! A strided block of rows copied between two buffers (`kernels/copy_rows.cu`), 16 bytes per
//! thread where the layout allows: the query heads of a fused QKV buffer to the dense
//! `[b, s, h, d]` cuDNN's attention reads, and its dQ back between the key and value heads.

use super::dptr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::Result;

crate::kernel_module!(MODULE, "copy_rows");

/// Units (16-byte vectors, or bytes) a block copies: a few KiB keep blocks busy and many.
const UNITS_PER_BLOCK: usize = 2048;
const THREADS: u32 = 256;

/// Element offsets, strides and sizes of one copy: `rows` rows of `cols` elements, row `r`
/// from `src_offset + r·src_stride` to `dst_offset + r·dst_stride`.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    pub rows: usize,
    pub cols: usize,
    pub src_offset: usize,
    pub src_stride: usize,
    pub dst_offset: usize,
    pub dst_stride: usize,
}

impl Rows {
    /// The copy back: every row from where this one writes it to where it reads it.
    pub fn reversed(self) -> Self {
        Self {
            src_offset: self.dst_offset,
            src_stride: self.dst_stride,
            dst_offset: self.src_offset,
            dst_stride: self.src_stride,
            ..self
        }
    }
}

/// Copies `r` from `src` into `dst` (same dtype, on one GPU).
pub fn copy_rows(src: &CudaStorage, dst: &mut CudaStorage, r: Rows) -> Result<()> {
    use candle_core::backend::BackendStorage;
    let size = src.dtype().size_in_bytes();
    if dst.dtype() != src.dtype() {
        candle_core::bail!("copy rows: {:?} into {:?}", src.dtype(), dst.dtype());
    }
    if r.rows == 0 || r.cols == 0 {
        return Ok(());
    }
    let (row_bytes, src_s, dst_s) = (r.cols * size, r.src_stride * size, r.dst_stride * size);
    let dev = src.device.clone();
    let stream = dev.cuda_stream();
    let (sp, _g1) = dptr(src, &stream, r.src_offset)?;
    let (dp, _g2) = dptr(dst, &stream, r.dst_offset)?;
    let vec = [sp as usize, dp as usize, row_bytes, src_s, dst_s].iter().all(|x| x % 16 == 0);
    let (name, units) =
        if vec { ("copy_rows_16", row_bytes / 16) } else { ("copy_rows_1", row_bytes) };
    let rows_per_block = (UNITS_PER_BLOCK / units).max(1);
    if r.rows > u32::MAX as usize || units * rows_per_block > u32::MAX as usize {
        candle_core::bail!("copy rows: {} rows of {row_bytes} bytes is too large", r.rows);
    }
    let func = crate::function!(&dev, &MODULE, name)?;
    let cfg = LaunchConfig {
        grid_dim: (r.rows.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows, units, per_block) = (r.rows as u32, units as u32, rows_per_block as u32);
    let (src_s, dst_s) = (src_s as u64, dst_s as u64);
    let mut b = func.builder();
    b.arg(&sp).arg(&dp).arg(&rows).arg(&units).arg(&per_block).arg(&src_s).arg(&dst_s);
    // SAFETY: argument list matches `copy_rows_*`; the caller's storages hold every row
    // addressed (checked by the callers' shapes), kept alive by the guards above.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
