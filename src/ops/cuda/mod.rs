//! Fused CUDA kernels: the PTX that `build.rs` compiles from `kernels/*.cu`, and the
//! candle CustomOps that launch them.
//!
//! Every op here has a CPU/composite reference in the parent module (`ops::*`) that defines
//! its semantics; the CUDA version must agree with it within bf16 tolerance
//! (`mbridge selftest cuda` and the device scripts check that on a GPU).
//!
//! Conventions for adding a kernel: put `kernels/<module>.cu` (extern "C" `__global__`
//! functions), declare its PTX below with [`kernel_module!`], launch through [`function!`].
//! Forward passes are CustomOps (so candle records them in the graph); backward passes
//! launch directly from `bwd` and wrap the results with [`wrap`] (a backward result needs
//! no graph of its own).

pub mod adamw;
pub mod add;
pub mod copy_rows;
pub mod cross_entropy;
pub mod cudnn;
pub mod embedding;
pub mod flash_attn;
pub mod fp8;
pub mod gemm;
pub mod gemm_lt;
pub mod memory;
pub mod rms_norm;
pub mod rope;
pub mod rope_qkv;
pub mod sumsq;
pub mod swiglu;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, SyncOnDrop,
};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Shape, Storage, Tensor};

/// One compiled kernel file: its module name (the `.cu` file stem) and PTX text.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    /// File stem of `kernels/<name>.cu`; also the key candle caches the loaded module under.
    pub name: &'static str,
    /// PTX produced by nvcc at build time.
    pub ptx: &'static str,
}

/// `kernel_module!(NAME, "file_stem")` declares a [`KernelModule`] for `kernels/file_stem.cu`.
#[macro_export]
macro_rules! kernel_module {
    ($vis:vis $ident:ident, $stem:literal) => {
        $vis const $ident: $crate::ops::cuda::KernelModule = $crate::ops::cuda::KernelModule {
            name: concat!("mbridge_", $stem),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $stem, ".ptx")),
        };
    };
}

/// `function!(dev, MODULE, fn_name)`: the kernel `fn_name` of `MODULE` on `dev` (loaded once
/// per device, then cached by candle). A macro because candle's `CudaFunc` type is not
/// nameable outside candle; the value derefs to cudarc's `CudaFunction` (attributes) and
/// launches on candle's stream with `.builder()`.
#[macro_export]
macro_rules! function {
    ($dev:expr, $module:expr, $fn_name:expr) => {{
        let (module, fn_name): (&$crate::ops::cuda::KernelModule, &str) = (&$module, &$fn_name);
        $dev.get_or_load_custom_func(fn_name, module.name, module.ptx).map_err(|e| {
            candle_core::Error::Msg(format!("CUDA kernel {}::{fn_name}: {e}", module.name))
        })
    }};
}

/// Ceil division for grid sizes.
pub const fn div_ceil(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Blocks for a grid-stride elementwise kernel over `n` items with `threads` per block:
/// enough to fill an H100/H200 many times over, without a grid per element for huge `n`.
pub fn elementwise_blocks(n: usize, threads: usize) -> u32 {
    div_ceil(n, threads).clamp(1, 65_536) as u32
}

/// Kernel-name suffix of a float dtype (`rms_norm_fwd_bf16`, ...).
pub fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("fused CUDA kernels support f32/bf16/f16, got {other:?}"),
    })
}

/// The slice of `storage` a contiguous `layout` covers (from its start offset).
pub fn contiguous_view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: input must be contiguous, got strides {:?}", layout.stride())
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(a..b))
}

/// The CUDA storage behind a tensor's read guard (errors for other devices).
pub fn cuda_storage<'a>(storage: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("{what}: expected a CUDA tensor"),
    }
}

/// A graph-less tensor of `shape` over a freshly written device buffer.
pub fn wrap<T: CudaDType>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Runs `$body` with `$t` bound to the Rust element type of a float dtype.
#[macro_export]
macro_rules! with_float_type {
    ($dtype:expr, $t:ident, $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!("fused CUDA kernels support f32/bf16/f16, got {other:?}"),
        }
    };
}

/// Device address of element `offset` of a half-precision or f32/u32 storage.
pub fn dptr<'a>(
    s: &'a CudaStorage,
    stream: &'a CudaStream,
    offset: usize,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let (p, g, size) = match &s.slice {
        CudaStorageSlice::BF16(x) => {
            let (p, g) = x.device_ptr(stream);
            (p, g, 2)
        }
        CudaStorageSlice::F16(x) => {
            let (p, g) = x.device_ptr(stream);
            (p, g, 2)
        }
        CudaStorageSlice::F32(x) => {
            let (p, g) = x.device_ptr(stream);
            (p, g, 4)
        }
        CudaStorageSlice::U32(x) => {
            let (p, g) = x.device_ptr(stream);
            (p, g, 4)
        }
        _ => candle_core::bail!(
            "device pointer: unsupported storage dtype {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        ),
    };
    Ok((p + (offset * size) as u64, g))
}
