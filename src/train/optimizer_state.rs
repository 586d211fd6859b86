//! Optimizer state as named tensors, for checkpoints.
//!
//! Names are `<param>.exp_avg`, `<param>.exp_avg_sq` (Adam), `<param>.momentum_buffer` (SGD) and
//! `<param>.master` (only for parameters whose model dtype is narrower than f32). The step
//! count travels beside the tensors. Every tensor is written in the master dtype (bf16 moments
//! as the f32 values they hold, as Transformer Engine's FusedAdam saves them), so a state loads
//! into any [`super::optimizer::StateStorage`].

use std::collections::HashMap;

use candle_core::Tensor;

use super::optimizer::{master_dtype, Algorithm, OptimError, Optimizer};

/// Everything needed to resume an optimizer exactly.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    /// "adam" or "sgd" ([`Algorithm::name`]).
    pub algorithm: String,
    /// Optimizer steps taken (Adam's bias-correction step).
    pub steps: u64,
    /// Named state tensors, in parameter order.
    pub tensors: Vec<(String, Tensor)>,
}

fn first_moment_suffix(algorithm: &Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Adam(_) => "exp_avg",
        Algorithm::Sgd(_) => "momentum_buffer",
    }
}

impl Optimizer {
    /// Exports the state (f32 tensors share storage with the optimizer; they are never mutated
    /// in place, so this is a cheap snapshot; masters kept as remainders are merged into f32,
    /// bf16 moments widened to f32).
    pub fn export_state(&self) -> Result<OptimizerState, OptimError> {
        let m1 = first_moment_suffix(self.algorithm());
        let mut tensors = Vec::new();
        for p in self.params() {
            if p.master.stored().is_some() {
                // Remainders are written as the f32 masters they encode: a checkpoint loads
                // into either storage.
                tensors.push((format!("{}.master", p.name), p.master_value()?));
            }
            let mdt = master_dtype(p.var.dtype());
            tensors.push((format!("{}.{m1}", p.name), p.exp_avg.to_dtype(mdt)?));
            if let Some(v) = &p.exp_avg_sq {
                tensors.push((format!("{}.exp_avg_sq", p.name), v.to_dtype(mdt)?));
            }
        }
        Ok(OptimizerState {
            algorithm: self.algorithm().name().to_string(),
            steps: self.steps(),
            tensors,
        })
    }

    /// Restores a state written by [`Self::export_state`] for the same parameters. Every
    /// expected tensor must be present with the parameter's shape, and no extra tensor may be
    /// present; tensors are cast to the dtype the optimizer keeps them in and moved to the
    /// parameter's device.
    /// The model variables are set to the restored masters rounded to their dtype (what the
    /// checkpoint's model tensors hold when the same master storage wrote it). On error nothing
    /// is changed.
    pub fn import_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        let name = self.algorithm().name();
        if state.algorithm != name {
            return Err(OptimError::AlgorithmMismatch {
                expected: name.to_string(),
                found: state.algorithm.clone(),
            });
        }
        let mut by_name: HashMap<&str, &Tensor> = HashMap::new();
        for (n, t) in &state.tensors {
            by_name.insert(n.as_str(), t);
        }
        let m1 = first_moment_suffix(self.algorithm());
        let is_adam = matches!(self.algorithm(), Algorithm::Adam(_));
        // Validate and convert everything first so a failure leaves the optimizer untouched.
        let mut restored = Vec::with_capacity(self.params().len());
        for p in self.params() {
            let dims = p.var.dims().to_vec();
            let mut take = |key: String, dtype: candle_core::DType| -> Result<Tensor, OptimError> {
                let t = by_name
                    .remove(key.as_str())
                    .ok_or_else(|| OptimError::MissingStateTensor(key.clone()))?;
                if t.dims() != dims.as_slice() {
                    return Err(OptimError::StateShape {
                        name: key,
                        expected: dims.clone(),
                        got: t.dims().to_vec(),
                    });
                }
                Ok(t.to_dtype(dtype)?.to_device(p.var.device())?.detach())
            };
            let master = match p.master.stored() {
                Some(_) => Some(take(format!("{}.master", p.name), master_dtype(p.var.dtype()))?),
                None => None,
            };
            let exp_avg = take(format!("{}.{m1}", p.name), p.exp_avg.dtype())?;
            let exp_avg_sq = match (&p.exp_avg_sq, is_adam) {
                (Some(v), true) => Some(take(format!("{}.exp_avg_sq", p.name), v.dtype())?),
                _ => None,
            };
            restored.push((master, exp_avg, exp_avg_sq));
        }
        if let Some(extra) = state.tensors.iter().find(|(n, _)| by_name.contains_key(n.as_str())) {
            return Err(OptimError::UnexpectedStateTensor(extra.0.clone()));
        }
        for (p, (master, exp_avg, exp_avg_sq)) in self.params_mut().iter_mut().zip(restored) {
            if let Some(m) = master {
                p.set_master(m)?;
            }
            p.exp_avg = exp_avg;
            p.exp_avg_sq = exp_avg_sq;
        }
        self.set_steps(state.steps);
        Ok(())
    }
}
