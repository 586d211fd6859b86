//! Fused CUDA kernels: the PTX that `build.rs` compiles from `kernels/*.cu`, and the
//! candle CustomOps that launch them.
//!
//! Every op here has a CPU/composite reference in the parent module (`ops::*`) that defines
//! its semantics; the CUDA version must agree with it within bf16 tolerance
//! (`mbridge selftest cuda` and the device scripts check that on a GPU).
//!
//! Conventions for adding a kernel: put `kernels/<module>.cu` (extern "C" `__global__`
//! functions), declare its PTX below with [`kernel_module!`], launch through [`function`].

use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;

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

/// The kernel `fn_name` of `module` on `dev` (loaded once per device, then cached by candle).
pub fn function(
    dev: &CudaDevice,
    module: &KernelModule,
    fn_name: &str,
) -> Result<candle_core::cuda_backend::CudaFunc> {
    dev.get_or_load_custom_func(fn_name, module.name, module.ptx)
        .map_err(|e| candle_core::Error::Msg(format!("CUDA kernel {}::{fn_name}: {e}", module.name)))
}

/// Ceil division for grid sizes.
pub const fn div_ceil(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

