//! The dtype parameter gradients are produced and summed in ("main grads", after
//! megatron-core's `main_grad` buffers), for bf16 parameters:
//! - f32 by default: Megatron's `grad_reduce_in_fp32 = true`. The weight-gradient GEMMs
//!   write f32 straight from their f32 accumulators.
//! - bf16 under `ddp.grad_reduce_in_fp32 = false`, which Megatron Bridge's performance
//!   recipes set: the GEMMs write bf16, the sums and the data-parallel reduction stay in bf16,
//!   and the optimizer reads them into its f32 step (megatron-core's bf16 `main_grad` copied
//!   to the fp32 master's gradient). Half the bytes written by every weight-gradient GEMM and
//!   read by the gradient norm and the optimizer.
//!
//! f16 and f32 parameters always get f32 (f64: f64) gradients.
//!
//! The choice is per thread, set by the trainer for the extent of its loop
//! ([`bf16_main_grads`]): the model's backward passes, recomputed segments and written-out
//! layers run on the thread that calls `backward`, deep below any configuration.

use candle_core::DType;
use std::cell::Cell;

thread_local! {
    static BF16_MAIN_GRADS: Cell<bool> = const { Cell::new(false) };
}

/// Restores the previous choice when dropped.
#[must_use = "the choice lasts as long as the guard"]
pub struct MainGradsGuard {
    previous: bool,
}

impl Drop for MainGradsGuard {
    fn drop(&mut self) {
        BF16_MAIN_GRADS.with(|c| c.set(self.previous));
    }
}

/// Makes bf16 parameters' gradients bf16 (`on`) or f32 on this thread until the guard drops.
pub fn bf16_main_grads(on: bool) -> MainGradsGuard {
    MainGradsGuard { previous: BF16_MAIN_GRADS.with(|c| c.replace(on)) }
}

/// Whether bf16 parameters get bf16 gradients on this thread.
pub fn bf16_main_grads_on() -> bool {
    BF16_MAIN_GRADS.with(Cell::get)
}

/// The dtype of the gradients of a parameter of `param` dtype on this thread.
pub fn main_grad_dtype(param: DType) -> DType {
    match param {
        // FP8 primary weights exist in bf16 runs only: their gradients are the bf16 params'.
        DType::BF16 | DType::F8E4M3 if bf16_main_grads_on() => DType::BF16,
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_only_for_bf16_parameters_and_only_inside_the_guard() {
        assert_eq!(main_grad_dtype(DType::BF16), DType::F32);
        {
            let _g = bf16_main_grads(true);
            assert_eq!(main_grad_dtype(DType::BF16), DType::BF16);
            assert_eq!(main_grad_dtype(DType::F16), DType::F32);
            assert_eq!(main_grad_dtype(DType::F32), DType::F32);
            assert_eq!(main_grad_dtype(DType::F64), DType::F64);
            // Another thread keeps the default.
            let elsewhere = std::thread::spawn(|| main_grad_dtype(DType::BF16)).join().unwrap();
            assert_eq!(elsewhere, DType::F32);
        }
        assert_eq!(main_grad_dtype(DType::BF16), DType::F32);
    }
}
