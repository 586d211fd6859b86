//! FP8 primary weights (`mixed_precision.fp8_param`, which Megatron Bridge's FP8 presets turn
//! on through `fp8_param_gather`; Transformer Engine's `fp8_model_init`): the weights of the
//! FP8 layers' GEMMs are kept as their E4M3 values (candle's `F8E4M3`, one byte each) instead
//! of bf16, cast from the f32 master after every optimizer step with the master's own
//! tensorwise scale. The forward reads the stored bytes in place; the input gradient's
//! transposed copy is written from them for each step (held across its micro-batches,
//! [`super::fp8_weights`]). The cast starts from the f32 master rather than from its bf16
//! rounding. It saves no memory against bf16 weights whose master is kept as a 16-bit
//! remainder (`store_param_remainders`, 4 bytes a weight): an FP8 weight needs a full f32
//! master (5).
//!
//! candle tensors carry no metadata, so the scale each weight was cast with lives here, keyed
//! by its variable's id (Transformer Engine keeps it inside its `Float8Tensor`). Every reader
//! outside the GEMMs (checkpoints, norms, the optimizer's first master) goes through
//! [`value_as`], which scales the stored values back.

use crate::ops::fp8::{dequantize_stored, quantize_stored_into, Fp8Weight};
use crate::ops::timing::section;
use candle_core::{DType, Device, Result, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};

/// The scale of one stored weight, and the values it was last set from when those were more
/// precise than FP8 (initial or loaded weights), for the optimizer's master.
struct Entry {
    scale_inv: Tensor,
    high_precision: Option<Tensor>,
}

/// Entries live as long as the process: a few bytes per weight, replaced in place by every
/// write, so their number stays that of the stored weights ever created.
static STORED: LazyLock<Mutex<HashMap<TensorId, Entry>>> = LazyLock::new(Default::default);

fn stored() -> MutexGuard<'static, HashMap<TensorId, Entry>> {
    // A panic elsewhere cannot leave the map half-written: insert is its only change.
    STORED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `t` is a stored FP8 weight.
pub fn is_stored(t: &Tensor) -> bool {
    t.dtype() == DType::F8E4M3
}

/// Casts `value` (the weight's shape, any float dtype, on any device) into the stored weight
/// `var` with its own scale. `high_precision`: whether to keep `value` (on the host) for the
/// optimizer's first master, as Transformer Engine's `preserve_high_precision_init_val`
/// does; the next write forgets it.
pub fn store(var: &Var, value: &Tensor, high_precision: bool) -> Result<()> {
    if !is_stored(var.as_tensor()) {
        candle_core::bail!("fp8 params: the variable is {:?}, not a stored FP8 weight", var.dtype())
    }
    if value.dims() != var.dims() {
        candle_core::bail!(
            "fp8 params: a value of shape {:?} for a weight of shape {:?}",
            value.dims(),
            var.dims()
        )
    }
    let device = var.device();
    let master = value.to_device(device)?.to_dtype(DType::F32)?;
    let scale_inv = section("fp8_param.cast", device, || quantize_stored_into(&master, var))?;
    let high_precision = match high_precision {
        true => Some(value.to_device(&Device::Cpu)?),
        false => None,
    };
    stored().insert(var.id(), Entry { scale_inv, high_precision });
    Ok(())
}

/// The `1 / scale` of the stored weight `t`.
fn scale_inv(t: &Tensor) -> Result<Tensor> {
    match stored().get(&t.id()) {
        Some(e) => Ok(e.scale_inv.clone()),
        None => candle_core::bail!(
            "fp8 params: a stored FP8 weight of shape {:?} without its scale",
            t.dims()
        ),
    }
}

/// The values of `t` as `dtype`: a stored weight scaled back from its FP8 values, any other
/// tensor cast.
pub fn value_as(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if !is_stored(t) {
        return t.to_dtype(dtype);
    }
    dequantize_stored(t, &scale_inv(t)?)?.to_dtype(dtype)
}

/// The master (as `dtype`) that the optimizer starts `t` from: for a stored weight the values
/// it was last stored from when those were kept ([`store`]), else its values scaled back;
/// any other tensor cast (detached).
pub fn master_init(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if !is_stored(t) {
        return t.detach().to_dtype(dtype);
    }
    let kept = stored().get(&t.id()).and_then(|e| e.high_precision.clone());
    match kept {
        Some(v) => v.to_device(t.device())?.to_dtype(dtype),
        None => value_as(t, dtype),
    }
}

/// The stored weight `w` as a GEMM operand; `transposed`: a backward follows.
pub fn weight(w: &Tensor, transposed: bool) -> Result<Fp8Weight> {
    Fp8Weight::from_stored(w, &scale_inv(w)?, transposed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fp8::{Fp8Format, Fp8Recipe};

    #[test]
    fn a_stored_weight_holds_the_e4m3_values_of_its_own_scale() {
        let w = Tensor::randn(0f32, 0.02, (8, 16), &Device::Cpu).unwrap();
        let var = Var::zeros((8, 16), DType::F8E4M3, &Device::Cpu).unwrap();
        store(&var, &w, true).unwrap();
        let values: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = Fp8Format::E4M3.max() / amax;
        let expected: Vec<f32> =
            values.iter().map(|v| Fp8Format::E4M3.round(v * scale) * (1.0 / scale)).collect();
        let got: Vec<f32> = value_as(var.as_tensor(), DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-6 * e.abs(), "{g} vs {e}");
        }
        // The largest magnitude maps onto E4M3's largest value.
        assert!(got.iter().any(|g| (g.abs() - amax).abs() <= 1e-6 * amax));
        // The optimizer starts from the values given, not their FP8 rounding; a later write
        // (the optimizer's) forgets them.
        let m = master_init(var.as_tensor(), DType::F32).unwrap();
        assert_eq!(m.flatten_all().unwrap().to_vec1::<f32>().unwrap(), values);
        store(&var, &w, false).unwrap();
        let m = master_init(var.as_tensor(), DType::F32).unwrap();
        let m: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(m, got);
    }

    #[test]
    fn the_gemm_of_a_stored_weight_is_that_of_the_weight_quantized_at_the_gemm() {
        // The same f32 values quantized by the GEMM (bf16-parameter path) and stored: the
        // stored path gives the same product exactly.
        let recipe = Fp8Recipe::from_name("hybrid", true).unwrap();
        let w = Tensor::randn(0f32, 0.05, (16, 32), &Device::Cpu).unwrap();
        let var = Var::zeros((16, 32), DType::F8E4M3, &Device::Cpu).unwrap();
        store(&var, &w, false).unwrap();
        let x = Tensor::randn(0f32, 1.0, (8, 32), &Device::Cpu).unwrap();
        let y = |q| crate::ops::fp8::linear_saving(&x, q, None, &recipe, false, None).unwrap().0;
        let quantized = y(Fp8Weight::quantize(&w, &recipe).unwrap());
        let from_store = y(weight(var.as_tensor(), true).unwrap());
        let diff = (quantized - from_store).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn misuse_is_named() {
        let var = Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let e = store(&var, var.as_tensor(), false).unwrap_err().to_string();
        assert!(e.contains("not a stored FP8 weight"), "{e}");
        let stored = Var::zeros((2, 2), DType::F8E4M3, &Device::Cpu).unwrap();
        let e = value_as(stored.as_tensor(), DType::F32).unwrap_err().to_string();
        assert!(e.contains("without its scale"), "{e}");
        let e = store(&stored, &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape [3]"), "{e}");
    }
}
