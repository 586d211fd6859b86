//! Global-norm gradient clipping as megatron-core's `get_grad_norm_fp32` +
//! `clip_grad_by_total_norm_fp32`: the L2 norm over all gradients in fp32, then every gradient
//! is multiplied by `clip_grad / (norm + 1e-6)` when that coefficient is below 1.
//!
//! Split in two so a parallel engine can all-reduce the squared norm between the halves:
//! [`local_sq_norm`] → (sum over ranks) → [`clip_by_total_norm`]. [`clip_grad_norm`] does both
//! on one rank.

use candle_core::{DType, Tensor, Var};

use super::grads::{GradSource, GradSourceMut};

/// Epsilon added to the norm before dividing, as megatron-core.
pub const CLIP_EPS: f64 = 1.0e-6;

/// Sum of squares of the gradients of `vars` (missing gradients count as zero).
///
/// Each tensor's sum of squares is computed in f32 (f64 for f64 gradients) like megatron-core's
/// `multi_tensor_l2norm`; the per-tensor sums are added in f64, in the order of `vars`, so the
/// result is deterministic.
pub fn local_sq_norm<'a, G, I>(grads: &G, vars: I) -> candle_core::Result<f64>
where
    G: GradSource + ?Sized,
    I: IntoIterator<Item = &'a Var>,
{
    let present: Vec<&Tensor> = vars.into_iter().filter_map(|v| grads.grad_of(v)).collect();
    sum_of_squares(&present)
}

/// `Σ t²` over all of `tensors` (f32 per tensor, f64 across them, in order): the multi-block
/// CUDA reduction when it applies, candle ops otherwise.
pub fn sum_of_squares(present: &[&Tensor]) -> candle_core::Result<f64> {
    if let Some(per_tensor) = fused_sums_of_squares(present)? {
        return Ok(per_tensor.iter().sum());
    }
    // One host transfer per run of same-device tensors instead of one per tensor: the
    // per-tensor sums stay on their device until the end.
    let mut sums: Vec<Tensor> = Vec::new();
    for &g in present {
        let dtype = if g.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        sums.push(g.to_dtype(dtype)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.reshape(1)?);
    }
    let mut total = 0.0f64;
    let mut start = 0;
    while start < sums.len() {
        let device = sums[start].device().clone();
        let end = (start..sums.len())
            .find(|&i| !sums[i].device().same_device(&device))
            .unwrap_or(sums.len());
        for v in Tensor::cat(&sums[start..end], 0)?.to_vec1::<f64>()? {
            total += v;
        }
        start = end;
    }
    Ok(total)
}

/// Per-tensor sums of squares with the multi-block CUDA reduction, when every gradient is on
/// one GPU in f32/bf16/f16 and fused kernels are on (candle's `sum_all` reduces a whole
/// tensor in a single block); `None` = use the composite path.
#[cfg(feature = "cuda")]
fn fused_sums_of_squares(gs: &[&Tensor]) -> candle_core::Result<Option<Vec<f64>>> {
    let Some(first) = gs.first() else { return Ok(None) };
    let device = first.device();
    let eligible = gs.iter().all(|g| {
        g.device().same_device(device)
            && crate::ops::fused::use_fused_optimizer(g.device(), g.dtype())
    });
    if !eligible {
        return Ok(None);
    }
    crate::ops::cuda::sumsq::sums_of_squares(gs).map(Some)
}

#[cfg(not(feature = "cuda"))]
fn fused_sums_of_squares(_gs: &[&Tensor]) -> candle_core::Result<Option<Vec<f64>>> {
    Ok(None)
}

/// The clipping coefficient for a total norm, or `None` when no scaling applies
/// (coefficient ≥ 1, or a non-finite norm, which the caller must handle).
pub fn clip_coeff(total_norm: f64, clip_grad: f64) -> Option<f64> {
    if !total_norm.is_finite() {
        return None;
    }
    let coeff = clip_grad / (total_norm + CLIP_EPS);
    (coeff < 1.0).then_some(coeff)
}

/// Scales the gradients of `vars` in place for a known total norm; returns the coefficient used.
pub fn clip_by_total_norm<'a, G, I>(
    grads: &mut G,
    vars: I,
    clip_grad: f64,
    total_norm: f64,
) -> candle_core::Result<Option<f64>>
where
    G: GradSourceMut + ?Sized,
    I: IntoIterator<Item = &'a Var>,
{
    let Some(coeff) = clip_coeff(total_norm, clip_grad) else {
        return Ok(None);
    };
    for var in vars {
        let Some(g) = grads.grad_of(var) else {
            continue;
        };
        let scaled = g.affine(coeff, 0.0)?;
        grads.set_grad(var, scaled);
    }
    Ok(Some(coeff))
}

/// The global gradient norm and what clipping did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradNorm {
    /// L2 norm of all gradients before clipping (the log line's "grad norm").
    pub norm: f64,
    /// Coefficient applied, if the gradients were scaled.
    pub coeff: Option<f64>,
}

impl GradNorm {
    /// False for NaN or ±Inf: the caller decides whether to stop or skip the step (gradients are
    /// left unscaled in that case).
    pub fn is_finite(&self) -> bool {
        self.norm.is_finite()
    }
}

/// Computes the global norm of the gradients of `vars` and, when `clip_grad > 0`, clips them in
/// place. Single-rank form of `local_sq_norm` + all-reduce + `clip_by_total_norm`.
pub fn clip_grad_norm<'a, G, I>(
    grads: &mut G,
    vars: I,
    clip_grad: f64,
) -> candle_core::Result<GradNorm>
where
    G: GradSourceMut + ?Sized,
    I: IntoIterator<Item = &'a Var> + Clone,
{
    let norm = local_sq_norm(grads, vars.clone())?.powf(0.5);
    let coeff =
        if clip_grad > 0.0 { clip_by_total_norm(grads, vars, clip_grad, norm)? } else { None };
    Ok(GradNorm { norm, coeff })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::backprop::GradStore;
    use candle_core::Device;

    fn setup(values: &[f32]) -> (Var, GradStore) {
        let var = Var::zeros(values.len(), DType::F32, &Device::Cpu).unwrap();
        let mut grads = GradStore::default();
        grads.insert(var.as_tensor(), Tensor::new(values, &Device::Cpu).unwrap());
        (var, grads)
    }

    #[test]
    fn clips_to_the_norm_with_megatron_epsilon() {
        let (var, mut grads) = setup(&[3.0, 4.0]);
        let n = clip_grad_norm(&mut grads, [&var], 1.0).unwrap();
        assert_eq!(n.norm, 5.0);
        let coeff = 1.0 / (5.0 + 1e-6);
        assert_eq!(n.coeff, Some(coeff));
        let g: Vec<f32> = grads.grad_of(&var).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![3.0 * coeff as f32, 4.0 * coeff as f32]);
    }

    #[test]
    fn leaves_small_or_unclipped_gradients_alone() {
        let (var, mut grads) = setup(&[0.3, 0.4]);
        let n = clip_grad_norm(&mut grads, [&var], 1.0).unwrap();
        assert_eq!((n.coeff, n.is_finite()), (None, true));
        let (var, mut grads) = setup(&[30.0, 40.0]);
        let n = clip_grad_norm(&mut grads, [&var], 0.0).unwrap();
        assert_eq!((n.norm, n.coeff), (50.0, None));
        assert_eq!(grads.grad_of(&var).unwrap().to_vec1::<f32>().unwrap(), vec![30.0, 40.0]);
    }

    #[test]
    fn non_finite_norm_is_reported_not_applied() {
        for bad in [f32::NAN, f32::INFINITY] {
            let (var, mut grads) = setup(&[1.0, bad]);
            let n = clip_grad_norm(&mut grads, [&var], 1.0).unwrap();
            assert!(!n.is_finite());
            assert_eq!(n.coeff, None);
            assert_eq!(grads.grad_of(&var).unwrap().to_vec1::<f32>().unwrap()[0], 1.0);
        }
    }
}
