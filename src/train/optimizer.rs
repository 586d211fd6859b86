//! Optimizers over candle [`Var`]s with fp32 master weights: Adam (decoupled weight decay =
//! AdamW by default, or coupled L2) and SGD with momentum, with the update formulas and the
//! operation order of `torch.optim.Adam/AdamW/SGD` (single-tensor path), which megatron-core's
//! fused optimizers match mathematically.
//!
//! Precision: a parameter stored in bf16/f16 gets an f32 master copy; the update runs on the
//! master and the result is cast back into the model's `Var`. f32 parameters are their own
//! master (no copy), f64 parameters keep f64 everything (gradient checks on CPU). Moments are
//! kept in the master dtype, or in bf16 ([`StateStorage`], the precision-aware optimizer's
//! `exp_avg_dtype` / `exp_avg_sq_dtype`): the update then reads them into f32, steps with the
//! f32 values and stores them rounded, as Transformer Engine's FusedAdam does. With
//! [`MasterStorage::Remainders`]
//! (`optimizer.store_param_remainders`) a bf16 parameter's master is the parameter itself plus
//! a 16-bit remainder ([`crate::ops::param_remainder`]): the same f32 values in 2 bytes less.
//!
//! Parameter groups follow Megatron's default: no weight decay for biases (name ending in
//! `.bias`) and 1-D parameters (norm weights); see [`default_wd_mult`].

use std::collections::HashSet;

use candle_core::{DType, Tensor, Var};

use super::grads::GradSource;
use super::scheduler::OptimizerParamScheduler;
use crate::model::fp8_params;
use crate::ops::param_remainder;

pub use super::grads::GradAccumulator;
pub use super::optimizer_state::OptimizerState;

/// Errors from building, stepping or restoring an optimizer. Messages name the parameter.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// Two parameters share a name.
    #[error("parameter {0:?} is registered twice")]
    DuplicateParam(String),
    /// A parameter is not a floating-point tensor.
    #[error(
        "parameter {name:?} has dtype {dtype:?}; only floating-point parameters can be trained"
    )]
    NonFloatParam {
        /// Parameter name.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// A gradient's shape differs from its parameter's.
    #[error("gradient of {name:?} has shape {got:?}, parameter has {expected:?}")]
    GradShape {
        /// Parameter name.
        name: String,
        /// Parameter shape.
        expected: Vec<usize>,
        /// Gradient shape.
        got: Vec<usize>,
    },
    /// State import: a tensor the optimizer needs is absent.
    #[error("optimizer state has no tensor {0:?}")]
    MissingStateTensor(String),
    /// State import: a tensor has the wrong shape.
    #[error("optimizer state tensor {name:?} has shape {got:?}, expected {expected:?}")]
    StateShape {
        /// Tensor name.
        name: String,
        /// Shape the parameter needs.
        expected: Vec<usize>,
        /// Shape found.
        got: Vec<usize>,
    },
    /// State import: a tensor belongs to no parameter (probably another model or optimizer).
    #[error("optimizer state tensor {0:?} matches no parameter of this optimizer")]
    UnexpectedStateTensor(String),
    /// State import: the state was written by another algorithm.
    #[error("optimizer state is for {found:?}, this optimizer is {expected:?}")]
    AlgorithmMismatch {
        /// This optimizer's algorithm.
        expected: String,
        /// The state's.
        found: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Adam hyper-parameters (`optimizer.adam_*`, `optimizer.decoupled_weight_decay`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// `adam_beta1`.
    pub beta1: f64,
    /// `adam_beta2`.
    pub beta2: f64,
    /// `adam_eps`, added outside the square root.
    pub eps: f64,
    /// true: AdamW (`p ← p·(1 − lr·wd)`); false: Adam with L2 (`g ← g + wd·p`).
    pub decoupled_weight_decay: bool,
}

impl Default for AdamConfig {
    /// megatron-core's `OptimizerConfig` defaults.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, decoupled_weight_decay: true }
    }
}

/// SGD hyper-parameters (`optimizer.sgd_momentum`); no dampening, no Nesterov, as Megatron.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Momentum factor; 0 disables the buffer's effect.
    pub momentum: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self { momentum: 0.9 }
    }
}

/// Which update rule the optimizer applies (`optimizer.optimizer`: "adam" or "sgd").
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Algorithm {
    /// Adam / AdamW.
    Adam(AdamConfig),
    /// SGD with momentum.
    Sgd(SgdConfig),
}

impl Algorithm {
    /// Name written into checkpoints ("adam" or "sgd").
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::Adam(_) => "adam",
            Algorithm::Sgd(_) => "sgd",
        }
    }
}

/// Megatron's default parameter grouping: weight-decay multiplier 0 for biases and 1-D
/// parameters (norm weights), 1 otherwise.
pub fn default_wd_mult(name: &str, rank: usize) -> f64 {
    if name.ends_with(".bias") || rank == 1 {
        0.0
    } else {
        1.0
    }
}

/// Whether `name` (a parameter, or a distributed optimizer's slice `name[a..b]` of one) is the
/// word embedding or the output layer, megatron-core's `is_embedding_or_output_parameter`.
pub fn is_embedding_or_output(name: &str) -> bool {
    let param = name.split('[').next().unwrap_or(name);
    param == "embedding.word_embeddings.weight" || param == "output_layer.weight"
}

/// `params` with [`default_wd_mult`]'s multipliers, for [`Optimizer::with_storage`].
pub fn default_groups(params: Vec<(String, Var)>) -> Vec<(String, Var, f64)> {
    params
        .into_iter()
        .map(|(name, var)| {
            let wd_mult = default_wd_mult(&name, var.rank());
            (name, var, wd_mult)
        })
        .collect()
}

/// dtype of the master copy and optimizer state for a parameter of `dtype`.
pub fn master_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// How the optimizer keeps the fp32 masters of bf16 parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MasterStorage {
    /// A full f32 copy (megatron-core's default).
    #[default]
    Copy,
    /// The bf16 parameter plus an i16 remainder (`optimizer.use_precision_aware_optimizer` with
    /// `optimizer.store_param_remainders`): the parameter is then the master rounded half away
    /// from zero instead of half to even. Other dtypes keep [`MasterStorage::Copy`].
    Remainders,
}

/// How the optimizer keeps its state: the masters of bf16 parameters, and the dtype of each
/// moment for parameters with f32 masters (f64 parameters keep f64 moments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateStorage {
    pub masters: MasterStorage,
    /// Adam's first moment (SGD's momentum buffer): f32 or bf16.
    pub exp_avg: DType,
    /// Adam's second moment: f32 or bf16.
    pub exp_avg_sq: DType,
}

impl Default for StateStorage {
    /// megatron-core's default: f32 master copies and moments.
    fn default() -> Self {
        MasterStorage::Copy.into()
    }
}

impl From<MasterStorage> for StateStorage {
    /// `masters` with f32 moments.
    fn from(masters: MasterStorage) -> Self {
        Self { masters, exp_avg: DType::F32, exp_avg_sq: DType::F32 }
    }
}

impl StateStorage {
    /// The dtype a moment stored as `wanted` takes for a parameter whose master is `mdt`.
    fn moment_dtype(wanted: DType, mdt: DType) -> DType {
        if mdt == DType::F64 {
            mdt
        } else {
            wanted
        }
    }
}

/// Where a parameter's master value lives.
#[derive(Debug)]
pub enum Master {
    /// The variable is f32/f64: it is its own master.
    Variable,
    /// An f32 copy beside the narrower variable.
    Copy(Tensor),
    /// The low 16 bits of the f32 master (i16); the bf16 variable holds the high 16 bits.
    Remainder(Tensor),
}

impl Master {
    /// The tensor the optimizer keeps beside the variable (memory reports), if any.
    pub fn stored(&self) -> Option<&Tensor> {
        match self {
            Master::Variable => None,
            Master::Copy(t) | Master::Remainder(t) => Some(t),
        }
    }
}

/// One trainable parameter and its optimizer state.
#[derive(Debug)]
pub struct ParamState {
    /// Megatron name, e.g. `decoder.layers.0.self_attention.linear_qkv.weight`.
    pub name: String,
    /// The model's variable; updated in place after each step.
    pub var: Var,
    /// Multiplier on the scheduler's weight decay (0 for the no-decay group).
    pub wd_mult: f64,
    /// The word embedding or the output layer, which take `optimizer.decoupled_lr` when it is
    /// set (megatron-core's `is_embedding_or_output_parameter`).
    pub decoupled_lr: bool,
    /// The fp32 master when the variable is stored in a narrower dtype.
    pub master: Master,
    /// Adam first moment or SGD momentum buffer (zeros before the first step; with zero
    /// dampening `0·μ + g` equals torch's lazily cloned buffer exactly).
    pub exp_avg: Tensor,
    /// Adam second moment (`None` for SGD).
    pub exp_avg_sq: Option<Tensor>,
}

impl ParamState {
    /// Current master value (detached, so updates never build an autograd graph).
    pub fn master_value(&self) -> candle_core::Result<Tensor> {
        match &self.master {
            Master::Variable => Ok(self.var.as_detached_tensor()),
            Master::Copy(m) => Ok(m.clone()),
            Master::Remainder(r) => param_remainder::merge(&self.var.as_detached_tensor(), r),
        }
    }

    /// The parameter as `dtype`: the variable itself when it has that dtype (with remainders
    /// it is rounded half away from zero, which a cast of the master would not reproduce).
    pub fn value_as(&self, dtype: DType) -> candle_core::Result<Tensor> {
        if self.var.dtype() == dtype {
            Ok(self.var.as_detached_tensor())
        } else {
            self.master_value()?.to_dtype(dtype)
        }
    }

    /// Sets the master to `value` (master dtype) and the variable to it rounded.
    pub fn set_master(&mut self, value: Tensor) -> candle_core::Result<()> {
        match &self.master {
            Master::Variable => self.var.set(&value)?,
            Master::Copy(_) => {
                if fp8_params::is_stored(self.var.as_tensor()) {
                    fp8_params::store(&self.var, &value, false)?;
                } else {
                    self.var.set(&value.to_dtype(self.var.dtype())?)?;
                }
                self.master = Master::Copy(value);
            }
            Master::Remainder(_) => {
                let (hi, rem) = param_remainder::split(&value)?;
                self.var.set(&hi)?;
                self.master = Master::Remainder(rem);
            }
        }
        Ok(())
    }

    /// Makes the master equal the variable's current value (weights loaded into the model).
    pub fn sync_master_from_var(&mut self) -> candle_core::Result<()> {
        let var = self.var.as_detached_tensor();
        self.master = match &self.master {
            Master::Variable => Master::Variable,
            Master::Copy(_) => {
                // Keyed by the variable's id, which a detached view does not share.
                Master::Copy(fp8_params::master_init(
                    self.var.as_tensor(),
                    master_dtype(var.dtype()),
                )?)
            }
            Master::Remainder(_) => {
                Master::Remainder(Tensor::zeros(var.shape(), DType::I16, var.device())?)
            }
        };
        Ok(())
    }
}

/// Adam/AdamW or SGD over a fixed, ordered list of named parameters.
#[derive(Debug)]
pub struct Optimizer {
    algorithm: Algorithm,
    params: Vec<ParamState>,
    /// Optimizer steps taken (Adam's bias-correction `t`).
    steps: u64,
    /// The embedding's and output layer's own learning rate ([`Self::set_decoupled_lr`]).
    decoupled_lr: Option<f64>,
}

impl Optimizer {
    /// Builds an optimizer with Megatron's default groups ([`default_wd_mult`]).
    pub fn new(algorithm: Algorithm, params: Vec<(String, Var)>) -> Result<Self, OptimError> {
        Self::with_wd_mults(algorithm, default_groups(params))
    }

    /// Builds an optimizer with explicit weight-decay multipliers per parameter.
    pub fn with_wd_mults(
        algorithm: Algorithm,
        params: Vec<(String, Var, f64)>,
    ) -> Result<Self, OptimError> {
        Self::with_storage(algorithm, params, MasterStorage::Copy)
    }

    /// [`Self::with_wd_mults`], keeping masters and moments as `storage` says.
    pub fn with_storage(
        algorithm: Algorithm,
        params: Vec<(String, Var, f64)>,
        storage: impl Into<StateStorage>,
    ) -> Result<Self, OptimError> {
        let storage: StateStorage = storage.into();
        let mut seen = HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var, wd_mult) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::DuplicateParam(name));
            }
            let dtype = var.dtype();
            if !dtype.is_float() {
                return Err(OptimError::NonFloatParam { name, dtype });
            }
            let mdt = master_dtype(dtype);
            let master = if dtype == mdt {
                Master::Variable
            } else if storage.masters == MasterStorage::Remainders && dtype == DType::BF16 {
                // The variable is the master exactly: every remainder is zero.
                Master::Remainder(Tensor::zeros(var.shape(), DType::I16, var.device())?)
            } else {
                // An FP8 primary weight's master starts from the values it was stored from.
                Master::Copy(fp8_params::master_init(var.as_tensor(), mdt)?)
            };
            let m1 = StateStorage::moment_dtype(storage.exp_avg, mdt);
            let m2 = StateStorage::moment_dtype(storage.exp_avg_sq, mdt);
            let zeros = Tensor::zeros(var.shape(), m1, var.device())?;
            // A buffer of its own (not a clone of `zeros`): the fused CUDA step updates the
            // moments in place, so they must not share storage.
            let exp_avg_sq = match algorithm {
                Algorithm::Adam(_) => Some(Tensor::zeros(var.shape(), m2, var.device())?),
                Algorithm::Sgd(_) => None,
            };
            let decoupled_lr = is_embedding_or_output(&name);
            states.push(ParamState {
                name,
                var,
                wd_mult,
                decoupled_lr,
                master,
                exp_avg: zeros,
                exp_avg_sq,
            });
        }
        Ok(Self { algorithm, params: states, steps: 0, decoupled_lr: None })
    }

    /// The update rule.
    pub fn algorithm(&self) -> &Algorithm {
        &self.algorithm
    }

    /// Parameters with their state, in registration order (the order used for norms).
    pub fn params(&self) -> &[ParamState] {
        &self.params
    }

    /// The variables, in registration order.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The learning rate of the embedding and output layer in the next steps
    /// (`optimizer.decoupled_lr` as the scheduler shapes it); None: the others' rate.
    pub fn set_decoupled_lr(&mut self, lr: Option<f64>) {
        self.decoupled_lr = lr;
    }

    /// Re-reads master copies from the model variables, for when the model's weights were
    /// replaced after the optimizer was built (e.g. loaded from a checkpoint without optimizer
    /// state).
    pub fn sync_master_from_model(&mut self) -> Result<(), OptimError> {
        for p in &mut self.params {
            p.sync_master_from_var()?;
        }
        Ok(())
    }

    /// One step with the scheduler's current lr and weight decay (`wd · wd_mult` per group).
    /// Call `scheduler.step(GBS)` afterwards, as megatron-core does.
    pub fn step_scheduled<G: GradSource + ?Sized>(
        &mut self,
        grads: &G,
        scheduler: &OptimizerParamScheduler,
    ) -> Result<(), OptimError> {
        self.step(grads, scheduler.get_lr(), scheduler.get_wd())
    }

    /// One optimizer step with learning rate `lr` and base weight decay `wd`.
    ///
    /// A parameter without a gradient is updated with a zero gradient, like megatron-core whose
    /// gradient buffers always exist (its moments still decay and weight decay still applies).
    /// Use [`Self::params_without_grad`] to detect such parameters.
    pub fn step<G: GradSource + ?Sized>(
        &mut self,
        grads: &G,
        lr: f64,
        wd: f64,
    ) -> Result<(), OptimError> {
        self.step_scaled(grads, lr, wd, None)
    }

    /// [`Self::step`] with every gradient multiplied by `grad_scale` first (the global-norm
    /// clipping coefficient, [`super::clip::clip_coeff`], divided by the fp16 loss scale): the
    /// same values as scaling the gradients in place beforehand, without a pass of its own.
    pub fn step_scaled<G: GradSource + ?Sized>(
        &mut self,
        grads: &G,
        lr: f64,
        wd: f64,
        grad_scale: Option<f64>,
    ) -> Result<(), OptimError> {
        self.step_scaled_each(grads, lr, wd, grad_scale, &mut |_, _| Ok(()))
    }

    /// [`Self::step_scaled`], calling `after(i, param)` once parameter `i` (in [`Self::params`]
    /// order) is updated, so a caller can start using the updated values (the distributed
    /// optimizer's parameter all-gathers) while the later parameters are still stepping.
    pub fn step_scaled_each<G: GradSource + ?Sized>(
        &mut self,
        grads: &G,
        lr: f64,
        wd: f64,
        grad_scale: Option<f64>,
        after: &mut dyn FnMut(usize, &ParamState) -> candle_core::Result<()>,
    ) -> Result<(), OptimError> {
        // Check every gradient first so a bad one leaves the optimizer and model untouched.
        for p in &self.params {
            if let Some(g) = grads.grad_of(&p.var) {
                if g.dims() != p.var.dims() {
                    return Err(OptimError::GradShape {
                        name: p.name.clone(),
                        expected: p.var.dims().to_vec(),
                        got: g.dims().to_vec(),
                    });
                }
            }
        }
        self.steps += 1;
        let t = self.steps as f64;
        let algorithm = self.algorithm;
        let (base_lr, decoupled) = (lr, self.decoupled_lr);
        for (i, p) in self.params.iter_mut().enumerate() {
            let lr = match (p.decoupled_lr, decoupled) {
                (true, Some(d)) => d,
                _ => base_lr,
            };
            if let Algorithm::Adam(c) = algorithm {
                if fused_adam(p, grads.grad_of(&p.var), lr, wd, t, &c, grad_scale)? {
                    after(i, p)?;
                    continue;
                }
            }
            let grad = match (grads.grad_of(&p.var), grad_scale) {
                (Some(g), None) => g.detach().to_dtype(master_dtype(p.var.dtype()))?,
                (Some(g), Some(c)) => {
                    g.detach().to_dtype(master_dtype(p.var.dtype()))?.affine(c, 0.0)?
                }
                (None, _) => {
                    Tensor::zeros(p.var.shape(), master_dtype(p.var.dtype()), p.var.device())?
                }
            };
            let param = p.master_value()?;
            let group_wd = wd * p.wd_mult;
            let new_param = match algorithm {
                Algorithm::Adam(c) => adam_update(p, &param, grad, lr, group_wd, t, &c)?,
                Algorithm::Sgd(c) => sgd_update(p, &param, grad, lr, group_wd, &c)?,
            };
            p.set_master(new_param)?;
            after(i, p)?;
        }
        Ok(())
    }

    /// Names of parameters that have no gradient in `grads`.
    pub fn params_without_grad<G: GradSource + ?Sized>(&self, grads: &G) -> Vec<&str> {
        self.params
            .iter()
            .filter(|p| grads.grad_of(&p.var).is_none())
            .map(|p| p.name.as_str())
            .collect()
    }

    pub(super) fn params_mut(&mut self) -> &mut [ParamState] {
        &mut self.params
    }

    pub(super) fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }
}

/// The Adam step of `p` with the fused CUDA kernel (in place, one launch) when
/// [`crate::ops::fused::use_fused_optimizer`] allows it; `Ok(false)` = not taken, use
/// [`adam_update`].
#[cfg(feature = "cuda")]
fn fused_adam(
    p: &mut ParamState,
    grad: Option<&Tensor>,
    lr: f64,
    wd: f64,
    t: f64,
    c: &AdamConfig,
    grad_scale: Option<f64>,
) -> Result<bool, OptimError> {
    use crate::ops::cuda::adamw::{adam_step, adam_step_remainder, AdamStep, WeightDecay};
    // An FP8 primary weight steps its f32 master as an f32 parameter, then is cast from it.
    let stored = fp8_params::is_stored(p.var.as_tensor());
    let dtype = if stored { DType::F32 } else { p.var.dtype() };
    if !crate::ops::fused::use_fused_optimizer(p.var.device(), dtype) {
        return Ok(false);
    }
    let group_wd = wd * p.wd_mult;
    let weight_decay = match (group_wd != 0.0, c.decoupled_weight_decay) {
        (false, _) => WeightDecay::None,
        (true, true) => WeightDecay::Decoupled(group_wd),
        (true, false) => WeightDecay::Coupled(group_wd),
    };
    let step = AdamStep {
        lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        t,
        weight_decay,
        grad_scale: grad_scale.unwrap_or(1.0),
    };
    let v = p.exp_avg_sq.as_ref().expect("Adam keeps a second moment");
    if v.dtype() != p.exp_avg.dtype() {
        // The kernels keep both moments in one dtype; mixed moments take the composite path.
        return Ok(false);
    }
    match &p.master {
        Master::Copy(m) if stored => {
            adam_step(m, &p.exp_avg, v, grad, None, &step)?;
            fp8_params::store(&p.var, m, false)?;
        }
        Master::Copy(m) => adam_step(m, &p.exp_avg, v, grad, Some(p.var.as_tensor()), &step)?,
        Master::Variable => adam_step(p.var.as_tensor(), &p.exp_avg, v, grad, None, &step)?,
        Master::Remainder(r) => {
            adam_step_remainder(p.var.as_tensor(), r, &p.exp_avg, v, grad, &step)?
        }
    }
    Ok(true)
}

#[cfg(not(feature = "cuda"))]
fn fused_adam(
    _p: &mut ParamState,
    _grad: Option<&Tensor>,
    _lr: f64,
    _wd: f64,
    _t: f64,
    _c: &AdamConfig,
    _grad_scale: Option<f64>,
) -> Result<bool, OptimError> {
    Ok(false)
}

/// torch `_single_tensor_adam`, step `t` (1-based), returning the new parameter value.
fn adam_update(
    p: &mut ParamState,
    param: &Tensor,
    mut grad: Tensor,
    lr: f64,
    wd: f64,
    t: f64,
    c: &AdamConfig,
) -> Result<Tensor, OptimError> {
    let mut param = param.clone();
    if wd != 0.0 {
        if c.decoupled_weight_decay {
            param = param.affine(1.0 - lr * wd, 0.0)?;
        } else {
            grad = (grad + param.affine(wd, 0.0)?)?;
        }
    }
    // Narrow moments are read into the master dtype; the step uses the unrounded new values
    // and only what is stored is rounded (Transformer Engine's FusedAdam).
    let mdt = grad.dtype();
    let m_prev = p.exp_avg.to_dtype(mdt)?;
    // exp_avg.lerp_(grad, 1 - beta1)  ==  m + (1-β1)·(g − m)
    let m = (&m_prev + (&grad - &m_prev)?.affine(1.0 - c.beta1, 0.0)?)?;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v_stored = p.exp_avg_sq.as_ref().expect("Adam keeps a second moment");
    let v_dtype = v_stored.dtype();
    let v_prev = v_stored.to_dtype(mdt)?;
    let v = (v_prev.affine(c.beta2, 0.0)? + grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let bias_correction1 = 1.0 - c.beta1.powf(t);
    let bias_correction2 = 1.0 - c.beta2.powf(t);
    let step_size = lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    // denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps); param.addcdiv_(exp_avg, denom, -step_size)
    let denom = v.sqrt()?.affine(1.0 / bias_correction2_sqrt, c.eps)?;
    let new_param = (param + m.affine(-step_size, 0.0)?.div(&denom)?)?;
    p.exp_avg = m.to_dtype(p.exp_avg.dtype())?;
    p.exp_avg_sq = Some(v.to_dtype(v_dtype)?);
    Ok(new_param)
}

/// torch `_single_tensor_sgd` with dampening 0 and no Nesterov.
fn sgd_update(
    p: &mut ParamState,
    param: &Tensor,
    mut grad: Tensor,
    lr: f64,
    wd: f64,
    c: &SgdConfig,
) -> Result<Tensor, OptimError> {
    if wd != 0.0 {
        grad = (grad + param.affine(wd, 0.0)?)?;
    }
    if c.momentum != 0.0 {
        // buf.mul_(momentum).add_(grad); the first step's buffer is 0, giving torch's clone.
        let buf = (p.exp_avg.to_dtype(grad.dtype())?.affine(c.momentum, 0.0)? + grad)?;
        grad = buf.clone();
        p.exp_avg = buf.to_dtype(p.exp_avg.dtype())?;
    }
    Ok((param + grad.affine(-lr, 0.0)?)?)
}
