//! Device set-up for training and Megatron-style memory statistics.
//!
//! cudarc allocates with `cuMemAllocAsync` from the device's default memory pool. That pool's
//! release threshold defaults to 0, so every synchronization (e.g. reading the loss) hands all
//! free memory back to the driver and the next step maps it again; raising the threshold
//! makes the pool behave like PyTorch's caching allocator. The pool also tracks the high-water
//! mark of memory in use, which is Megatron's "max allocated".

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        candle_core::bail!("{what} failed: {r:?}")
    }
}

fn default_pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let cu_dev = dev.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver query into a local out-parameter.
    check(
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev) },
        "cuDeviceGetDefaultMemPool",
    )?;
    Ok(pool)
}

fn pool_attr(dev: &CudaDevice, attr: sys::CUmemPool_attribute) -> Result<u64> {
    let pool = default_pool(dev)?;
    let mut v: u64 = 0;
    // SAFETY: the attributes queried here are all cuuint64_t.
    check(
        unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) },
        "cuMemPoolGetAttribute",
    )?;
    Ok(v)
}

fn set_pool_attr(dev: &CudaDevice, attr: sys::CUmemPool_attribute, mut v: u64) -> Result<()> {
    let pool = default_pool(dev)?;
    // SAFETY: as in `pool_attr`.
    check(
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut v as *mut u64).cast()) },
        "cuMemPoolSetAttribute",
    )
}

/// Prepares `dev` for training: keep freed memory in the pool (see the module docs) and turn
/// off cudarc's per-buffer event tracking, which records and waits on CUDA events around
/// every kernel launch to order multiple streams. mbridge issues all work on candle's one
/// stream per device (NCCL included), so the ordering is already given by the stream.
pub fn prepare_for_training(dev: &CudaDevice) -> Result<()> {
    set_pool_attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
    // SAFETY: single stream per device, see above; only buffers created after this call
    // are affected, which is why it runs before the model is built.
    unsafe { dev.disable_event_tracking() };
    Ok(())
}

/// `(max allocated, max reserved)` bytes of the pool since start or the last reset.
pub fn peak_bytes(dev: &CudaDevice) -> Result<(u64, u64)> {
    Ok((
        pool_attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        pool_attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
    ))
}

/// `(allocated, reserved)` bytes in use now.
pub fn current_bytes(dev: &CudaDevice) -> Result<(u64, u64)> {
    Ok((
        pool_attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        pool_attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
    ))
}
