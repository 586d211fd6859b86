//! `optimizer.*` (MCore `OptimizerConfig`) and `scheduler.*` (Megatron-LM `SchedulerConfig`).

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::model::DType;

/// Optimizer algorithm (`optimizer.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

/// `optimizer.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    #[default(OptimizerKind::Adam)]
    pub optimizer: OptimizerKind,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    #[default = 0.01]
    pub weight_decay: f64,
    pub apply_wd_to_qk_layernorm: bool,
    #[default = 0.9]
    pub adam_beta1: f64,
    #[default = 0.999]
    pub adam_beta2: f64,
    #[default = 1e-8]
    pub adam_eps: f64,
    /// AdamW (true, default) versus Adam with L2 regularisation folded into the gradient.
    #[default = true]
    pub decoupled_weight_decay: bool,
    #[default = 0.9]
    pub sgd_momentum: f64,
    #[default = 1.0]
    pub clip_grad: f64,
    pub fp16: bool,
    pub bf16: bool,
    #[default(DType::F32)]
    pub params_dtype: DType,
    #[default(DType::F32)]
    pub main_grads_dtype: DType,
    #[default(DType::F32)]
    pub main_params_dtype: DType,
    #[default(DType::F32)]
    pub exp_avg_dtype: DType,
    #[default(DType::F32)]
    pub exp_avg_sq_dtype: DType,
    /// megatron-core's precision-aware optimizer (Transformer Engine's FusedAdam): Adam with
    /// the distributed optimizer; the state dtypes above may then differ from fp32.
    pub use_precision_aware_optimizer: bool,
    /// Under the precision-aware optimizer, keep each bf16 parameter's fp32 master as the
    /// parameter plus its low 16 bits (exact, 2 bytes per parameter less).
    #[default = true]
    pub store_param_remainders: bool,
    pub use_distributed_optimizer: bool,
    pub overlap_param_gather: bool,
    pub overlap_param_gather_with_optimizer_step: bool,
    pub optimizer_cpu_offload: bool,
    pub optimizer_offload_fraction: f64,
    /// Static loss scale for fp16; None ⇒ dynamic scaling.
    pub loss_scale: Option<f64>,
    #[default = 4294967296.0]
    pub initial_loss_scale: f64,
    #[default = 1.0]
    pub min_loss_scale: f64,
    #[default = 1000]
    pub loss_scale_window: usize,
    #[default = 2]
    pub hysteresis: usize,
    pub log_num_zeros_in_grad: bool,
    /// Skip the update of a step whose gradient norm (before clipping) exceeds this, as
    /// megatron-core's optimizer does; None (Megatron's `inf`) never skips.
    pub grad_norm_skip_threshold: Option<f64>,
    /// The word embedding's and output layer's own peak learning rate (megatron-core's
    /// decoupled parameter group), on the same schedule; its floor is `decoupled_min_lr`
    /// (default `min_lr`).
    pub decoupled_lr: Option<f64>,
    pub decoupled_min_lr: Option<f64>,
    pub use_layer_wise_distributed_optimizer: bool,
    pub optimizer_cuda_graph: bool,
}

/// Learning-rate decay style (`scheduler.lr_decay_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LrDecayStyle {
    #[serde(rename = "constant")]
    Constant,
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "inverse-square-root")]
    InverseSquareRoot,
    #[serde(rename = "WSD")]
    Wsd,
}

/// Decay shape of the WSD schedule's final phase (`scheduler.lr_wsd_decay_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WsdDecayStyle {
    Exponential,
    Linear,
    Cosine,
    MinusSqrt,
}

/// Weight-decay increment style (`scheduler.weight_decay_incr_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WdIncrStyle {
    Constant,
    Linear,
    Cosine,
}

/// `scheduler.*` — units are iterations (or samples); the scheduler itself counts samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    #[default(LrDecayStyle::Linear)]
    pub lr_decay_style: LrDecayStyle,
    #[default(WsdDecayStyle::Exponential)]
    pub lr_wsd_decay_style: WsdDecayStyle,
    pub lr_decay_iters: Option<usize>,
    pub lr_decay_samples: Option<usize>,
    pub lr_wsd_decay_iters: Option<usize>,
    pub lr_wsd_decay_samples: Option<usize>,
    pub lr_warmup_fraction: Option<f64>,
    pub lr_warmup_iters: usize,
    pub lr_warmup_samples: usize,
    pub lr_warmup_init: f64,
    pub override_opt_param_scheduler: bool,
    pub use_checkpoint_opt_param_scheduler: bool,
    /// None ⇒ optimizer.weight_decay.
    pub start_weight_decay: Option<f64>,
    /// None ⇒ optimizer.weight_decay.
    pub end_weight_decay: Option<f64>,
    #[default(WdIncrStyle::Constant)]
    pub weight_decay_incr_style: WdIncrStyle,
    /// Schedule length for shortened runs (must be ≥ train_iters); None ⇒ train_iters.
    pub max_steps: Option<usize>,
    /// `"qwen3_next"`: Qwen3-Next's rule for which parameters get no weight decay; None is
    /// Megatron's (1-D parameters and biases).
    pub no_weight_decay_cond_type: Option<String>,
}
