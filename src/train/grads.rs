//! Where the optimizer and the clipper read gradients from: candle's [`GradStore`] straight
//! from `loss.backward()`, or a [`GradAccumulator`] that sums micro-batch gradients in f32.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::ops::main_grads::main_grad_dtype;

/// Read access to gradients keyed by variable.
pub trait GradSource {
    /// Gradient of `var`, if it has one.
    fn grad_of(&self, var: &Var) -> Option<&Tensor>;
}

/// Write access, for in-place clipping and data-parallel reduction.
pub trait GradSourceMut: GradSource {
    /// Replaces the gradient of `var` (which must already have one).
    fn set_grad(&mut self, var: &Var, grad: Tensor);
}

impl GradSource for GradStore {
    fn grad_of(&self, var: &Var) -> Option<&Tensor> {
        self.get(var.as_tensor())
    }
}

impl GradSourceMut for GradStore {
    fn set_grad(&mut self, var: &Var, grad: Tensor) {
        self.insert(var.as_tensor(), grad);
    }
}

/// The dtype `var`'s gradient `g` is kept in: the main-grad dtype
/// ([`crate::ops::main_grads`]), except that an f32 gradient of a half-precision parameter (a
/// tied output layer's) stays f32 rather than be rounded.
fn main_grad_of(var: &Var, g: &Tensor) -> candle_core::DType {
    let main = main_grad_dtype(var.dtype());
    if g.dtype() == candle_core::DType::F32 && main != candle_core::DType::F64 {
        candle_core::DType::F32
    } else {
        main
    }
}

/// Sums gradients over the micro-batches of one global batch in the main-grad dtype: f32
/// (f64 for f64 parameters) like megatron-core's fp32 `main_grad` buffers
/// (`grad_reduce_in_fp32`), or bf16 where [`crate::ops::main_grads`] says so.
///
/// Gradients are kept in the order of the variables given to [`GradAccumulator::new`], so
/// iteration (for norms and data-parallel all-reduce) is deterministic.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    grads: Vec<Option<Tensor>>,
    index: HashMap<TensorId, usize>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `vars` (typically [`super::optimizer::Optimizer::vars`]).
    pub fn new(vars: Vec<Var>) -> Self {
        let index = vars.iter().enumerate().map(|(i, v)| (v.id(), i)).collect();
        let grads = vec![None; vars.len()];
        Self { vars, grads, index, micro_batches: 0 }
    }

    /// Adds the gradients of one micro-batch. Variables absent from `store` contribute nothing;
    /// gradients of tensors that are not among the variables are ignored.
    pub fn accumulate(&mut self, store: &GradStore) -> candle_core::Result<()> {
        self.add(store)?;
        self.micro_batches += 1;
        Ok(())
    }

    /// Adds more gradients without counting another micro-batch (e.g. the step's sum of those
    /// that arrive outside the main [`GradStore`]: recomputed segments, written-out layers).
    pub fn add(&mut self, store: &GradStore) -> candle_core::Result<()> {
        for (var, slot) in self.vars.iter().zip(self.grads.iter_mut()) {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach().to_dtype(main_grad_of(var, g))?;
            *slot = Some(match slot.take() {
                Some(acc) => {
                    let g = g.to_dtype(acc.dtype())?;
                    (acc + g)?
                }
                None => g,
            });
        }
        Ok(())
    }

    /// Number of [`Self::accumulate`] calls since the last [`Self::clear`].
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Multiplies every gradient by `factor` (e.g. `1 / num_tokens` of the global batch).
    pub fn scale(&mut self, factor: f64) -> candle_core::Result<()> {
        for g in self.grads.iter_mut().flatten() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// Variables and their accumulated gradients, in order; the gradient can be replaced
    /// (e.g. by its all-reduced value).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Var, &mut Option<Tensor>)> {
        self.vars.iter().zip(self.grads.iter_mut())
    }

    /// Variables and their accumulated gradients, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Var, Option<&Tensor>)> {
        self.vars.iter().zip(self.grads.iter().map(|g| g.as_ref()))
    }

    /// Drops all gradients (start of the next global batch).
    pub fn clear(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.micro_batches = 0;
    }
}

impl GradSource for GradAccumulator {
    fn grad_of(&self, var: &Var) -> Option<&Tensor> {
        self.index.get(&var.id()).and_then(|&i| self.grads[i].as_ref())
    }
}

impl GradSourceMut for GradAccumulator {
    fn set_grad(&mut self, var: &Var, grad: Tensor) {
        if let Some(&i) = self.index.get(&var.id()) {
            self.grads[i] = Some(grad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::main_grads::bf16_main_grads;
    use candle_core::{DType, Device};

    /// One backward of `Σ w·x` per micro-batch for bf16 `w` (gradient `x`, in bf16) into an
    /// accumulator.
    fn accumulated(micro_batches: &[[f32; 2]]) -> Tensor {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::zeros(2, DType::BF16, &dev).unwrap()).unwrap();
        let mut acc = GradAccumulator::new(vec![w.clone()]);
        for x in micro_batches {
            let xt = Tensor::new(x, &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let store = (w.as_tensor() * &xt).unwrap().sum_all().unwrap().backward().unwrap();
            acc.accumulate(&store).unwrap();
        }
        acc.grad_of(&w).unwrap().clone()
    }

    #[test]
    fn bf16_parameters_keep_f32_or_bf16_main_grads_as_chosen() {
        // 1 + 2⁻⁸ is exact in f32 but halfway between two bf16 values (8 significant bits),
        // where bf16 rounds to the even 1.
        let micro_batches = [[1.0, 3.0], [1.0 / 256.0, 1.0]];
        let g = accumulated(&micro_batches);
        assert_eq!(g.dtype(), DType::F32);
        assert_eq!(g.to_vec1::<f32>().unwrap(), [1.0 + 1.0 / 256.0, 4.0]);
        let _half = bf16_main_grads(true);
        let h = accumulated(&micro_batches);
        assert_eq!(h.dtype(), DType::BF16);
        assert_eq!(h.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [1.0, 4.0]);
        // An f32 gradient of a bf16 parameter (a tied output layer's) is not rounded.
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::zeros(1, DType::BF16, &dev).unwrap()).unwrap();
        let mut store = candle_core::backprop::GradStore::default();
        store.insert(w.as_tensor(), Tensor::new(&[0.1f32], &dev).unwrap());
        let mut acc = GradAccumulator::new(vec![w.clone()]);
        acc.accumulate(&store).unwrap();
        assert_eq!(acc.grad_of(&w).unwrap().to_vec1::<f32>().unwrap(), [0.1]);
    }
}
