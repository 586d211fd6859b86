//! When the training path uses the fused CUDA kernels (`ops::cuda`) instead of the composite
//! candle ops: on a CUDA device, for bf16/f16 tensors (f32 on the GPU and everything on the
//! CPU keep the composite/CPU forms, which are the reference), unless turned off.
//!
//! `MBRIDGE_FUSED=0` in the environment turns them off for a run (A/B measurements, or to
//! rule a kernel out when debugging); [`set_override`] does the same from code (selftest
//! computes its references that way).

use candle_core::{DType, Device};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// 0 = follow the environment, 1 = force off, 2 = force on.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Forces the fused kernels on (`Some(true)`), off (`Some(false)`) or back to the
/// environment's choice (`None`), process-wide.
pub fn set_override(v: Option<bool>) {
    OVERRIDE.store(
        match v {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        },
        Ordering::Relaxed,
    );
}

/// Whether `MBRIDGE_FUSED` permits fused kernels (anything but `0`/`false`/`off`; unset = on).
pub fn env_allows(value: Option<&str>) -> bool {
    !matches!(value.map(str::trim), Some("0") | Some("false") | Some("off"))
}

fn enabled() -> bool {
    match OVERRIDE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            static ENV: OnceLock<bool> = OnceLock::new();
            *ENV.get_or_init(|| env_allows(std::env::var("MBRIDGE_FUSED").ok().as_deref()))
        }
    }
}

/// The dispatch rule on its own (testable without a GPU): fused kernels exist (`cuda`
/// feature), the tensor is on a CUDA device, it is half precision, and they are enabled.
pub fn rule(cuda_built: bool, is_cuda: bool, dtype: DType, enabled: bool) -> bool {
    cuda_built && is_cuda && matches!(dtype, DType::BF16 | DType::F16) && enabled
}

/// Whether an op on `dtype` tensors on `device` takes the fused CUDA path.
pub fn use_fused(device: &Device, dtype: DType) -> bool {
    rule(cfg!(feature = "cuda"), device.is_cuda(), dtype, enabled())
}

/// Whether the optimizer step of a parameter stored in `dtype` on `device` uses the fused
/// Adam kernel: as [`use_fused`], and also for f32 parameters (their own master).
pub fn use_fused_optimizer(device: &Device, dtype: DType) -> bool {
    let as_half = if dtype == DType::F32 { DType::BF16 } else { dtype };
    use_fused(device, as_half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_half_precision_on_cuda_is_fused() {
        assert!(rule(true, true, DType::BF16, true));
        assert!(rule(true, true, DType::F16, true));
        assert!(!rule(true, true, DType::F32, true), "f32 on the GPU stays composite");
        assert!(!rule(true, false, DType::BF16, true), "the CPU path is the reference");
        assert!(!rule(false, true, DType::BF16, true), "no kernels without the cuda feature");
        assert!(!rule(true, true, DType::BF16, false), "MBRIDGE_FUSED=0 turns them off");
    }

    #[test]
    fn environment_switch() {
        assert!(env_allows(None));
        assert!(env_allows(Some("1")));
        assert!(!env_allows(Some("0")));
        assert!(!env_allows(Some("off")));
        assert!(!env_allows(Some(" false ")));
    }

    #[test]
    fn cpu_tensors_never_take_the_fused_path() {
        set_override(Some(true));
        assert!(!use_fused(&Device::Cpu, DType::BF16));
        set_override(None);
    }
}
