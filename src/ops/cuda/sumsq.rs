//! Sums of squares of many tensors (the global gradient norm) with a multi-block reduction
//! per tensor, one launch that finishes all of them, and one host transfer.

use super::{contiguous_view, cuda_storage, dtype_suffix, wrap};
use crate::with_float_type;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Result, Tensor};

crate::kernel_module!(MODULE, "sumsq");

/// Blocks of the first pass (fixed, so results do not depend on timing).
const BLOCKS: usize = 1024;
const THREADS: u32 = 256;

/// `Σ t²` of each tensor (f32/bf16/f16 on one CUDA device), accumulated in f32 per block and
/// f64 across blocks, in input order.
pub fn sums_of_squares(ts: &[&Tensor]) -> Result<Vec<f64>> {
    let Some(first) = ts.first() else { return Ok(Vec::new()) };
    let dev = first.device().as_cuda_device()?.clone();
    // SAFETY: `out[k]` is written by the finishing launch's block k before it is read.
    let out = unsafe { dev.alloc::<f64>(ts.len())? };
    // Tensor k's partial sums at [k·BLOCKS, (k+1)·BLOCKS); slots its grid leaves unwritten
    // stay zero, so one launch finishes every tensor (one per tensor left the GPU idle
    // between ~200 tiny launches: 0.4 ms per Llama-3.2-1B step on an H200).
    let partial = dev.alloc_zeros::<f32>(ts.len() * BLOCKS)?;
    let finish = crate::function!(&dev, &MODULE, "sumsq_finish")?;
    for (k, t) in ts.iter().enumerate() {
        let t = t.contiguous()?;
        let n = t.elem_count();
        let blocks = super::div_ceil(n, THREADS as usize).clamp(1, BLOCKS);
        let f = crate::function!(
            &dev,
            &MODULE,
            &format!("sumsq_partial_{}", dtype_suffix(t.dtype())?)
        )?;
        let (s, l) = t.storage_and_layout();
        let s = cuda_storage(&s, "sum of squares")?;
        let n64 = n as u64;
        with_float_type!(t.dtype(), T, {
            let x = contiguous_view::<T>(s, l, "sum of squares")?;
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let slots = partial.slice(k * BLOCKS..(k + 1) * BLOCKS);
            let mut b = f.builder();
            b.arg(&x).arg(&n64).arg(&slots);
            // SAFETY: argument list matches `sumsq_partial_*` in kernels/sumsq.cu; the grid
            // writes at most BLOCKS slots.
            unsafe { b.launch(cfg) }.w()?;
        });
    }
    let per_tensor = BLOCKS as i32;
    let cfg = LaunchConfig {
        grid_dim: (ts.len() as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = finish.builder();
    b.arg(&partial).arg(&per_tensor).arg(&out);
    // SAFETY: argument list matches `sumsq_finish`; block k reads slots [k·BLOCKS, (k+1)·BLOCKS).
    unsafe { b.launch(cfg) }.w()?;
    wrap(out, &dev, ts.len()).to_vec1::<f64>()
}
