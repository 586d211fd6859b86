//! Gradient reductions of a parallel step: data-parallel all-reduce over a
//! [`GradAccumulator`], and the global gradient norm over the model-parallel group.

use super::comm::{Communicator, ReduceOp};
use super::tensor::counts_in_grad_norm;
use crate::model::Param;
use crate::train::clip::local_sq_norm;
use crate::train::grads::{GradAccumulator, GradSource};
use candle_core::{DType, Device, Result, Tensor};

/// Squared global gradient norm of the whole model: this rank's
/// [`local_sq_norm`] over the parameters that [`counts_in_grad_norm`], summed over the
/// model-parallel group `mp` (tp × pp). Call it after the data-parallel reduction (DP
/// replicas then hold equal gradients) and pass `sqrt` of the result to
/// [`crate::train::clip::clip_by_total_norm`]. Equals the TP=1/PP=1 squared norm.
pub fn model_parallel_grad_sq_norm<G: GradSource + ?Sized>(
    grads: &G,
    params: &[Param],
    tp_rank: usize,
    mp: &dyn Communicator,
) -> Result<f64> {
    let vars = params.iter().filter(|p| counts_in_grad_norm(p, tp_rank)).map(|p| &p.var);
    let local = local_sq_norm(grads, vars)?;
    let total = mp.all_reduce(&Tensor::new(&[local], &Device::Cpu)?, ReduceOp::Sum)?;
    Ok(total.to_vec1::<f64>()?[0])
}

/// Sums the accumulated gradients over the data-parallel group `dp` (in place), then
/// multiplies them by `scale` (e.g. `1 / global_token_count`, or 1 when the loss was already
/// normalised). Gradients of the same dtype travel in one flat buffer per call; a variable
/// without a gradient on this rank contributes zeros (and gets the others' sum). All ranks
/// must hold the same variables in the same order (the accumulator's fixed order).
pub fn all_reduce_grads(
    acc: &mut GradAccumulator,
    dp: &dyn Communicator,
    scale: f64,
) -> Result<()> {
    if dp.size() == 1 {
        return if scale == 1.0 { Ok(()) } else { acc.scale(scale) };
    }
    let mut slots: Vec<(&mut Option<Tensor>, Vec<usize>, DType, candle_core::Device)> = Vec::new();
    for (var, g) in acc.iter_mut() {
        // The same dtype on every rank, whether or not this one holds the gradient.
        let dtype = crate::ops::main_grads::main_grad_dtype(var.dtype());
        slots.push((g, var.dims().to_vec(), dtype, var.device().clone()));
    }
    let mut dtypes: Vec<DType> = slots.iter().map(|s| s.2).collect();
    dtypes.dedup();
    dtypes.sort_by_key(|d| d.as_str());
    dtypes.dedup();
    for dtype in dtypes {
        let mut flats = Vec::new();
        for (g, dims, dt, dev) in slots.iter() {
            if *dt != dtype {
                continue;
            }
            let t = match g.as_ref() {
                Some(t) => t.to_dtype(dtype)?.flatten_all()?,
                None => Tensor::zeros(dims.iter().product::<usize>(), dtype, dev)?,
            };
            flats.push(t);
        }
        let flat = Tensor::cat(&flats, 0)?;
        let mut summed = dp.all_reduce(&flat, ReduceOp::Sum)?;
        if scale != 1.0 {
            summed = summed.affine(scale, 0.0)?;
        }
        let mut offset = 0;
        for (g, dims, dt, _) in slots.iter_mut() {
            if *dt != dtype {
                continue;
            }
            let n: usize = dims.iter().product();
            **g = Some(summed.narrow(0, offset, n)?.reshape(dims.as_slice())?);
            offset += n;
        }
    }
    Ok(())
}
