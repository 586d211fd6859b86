//! `train.*` and `validation.*`: batch sizes, run length, exits, and evaluation cadence.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// `train.*` — Megatron-LM `TrainingConfig` plus Megatron Bridge's extensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub micro_batch_size: Option<usize>,
    /// None ⇒ micro_batch_size × data-parallel size.
    pub global_batch_size: Option<usize>,
    /// `[start, increment, ramp_samples]`; accepted for compatibility, rejected by validation.
    pub rampup_batch_size: Option<Vec<usize>>,
    pub decrease_batch_size_if_needed: bool,
    pub empty_unused_memory_level: u8,
    pub check_weight_hash_across_dp_replicas_interval: Option<usize>,
    pub train_sync_interval: Option<usize>,
    pub train_iters: Option<usize>,
    pub train_samples: Option<usize>,
    pub num_epochs: Option<f64>,
    pub exit_interval: Option<usize>,
    pub exit_duration_in_mins: Option<usize>,
    pub exit_signal_handler: bool,
    #[default = "SIGTERM"]
    pub exit_signal: String,
    pub manual_gc: bool,
    pub manual_gc_interval: usize,
    #[default = true]
    pub manual_gc_eval: bool,
    /// 1-indexed iterations whose optimizer step is skipped (data still consumed).
    pub iterations_to_skip: Vec<usize>,
    #[default = true]
    pub check_optimizer_step_success: bool,
    pub skip_sync_grad_norm_across_mp: bool,
    /// `"THRESHOLD:BS ..."` batch sizes by consumed tokens; refused as `rampup_batch_size` is.
    pub step_batch_size_schedule: Option<String>,
    pub gpu_sniff_test_interval: Option<usize>,
    pub exit_signal_handler_for_dataloader: bool,
    pub exit_signal_handler_for_training: bool,
    /// Megatron Bridge v0.2's places of `validation.eval_iters`, `eval_interval` and
    /// `skip_train`: a value set here is copied there, with a deprecation warning.
    pub eval_iters: Option<usize>,
    pub eval_interval: Option<usize>,
    pub skip_train: Option<bool>,
}

/// `validation.*` — Megatron-LM `ValidationConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Batches per evaluation; 0 disables validation.
    #[default(Some(100))]
    pub eval_iters: Option<usize>,
    /// None ⇒ evaluate only after training.
    pub eval_interval: Option<usize>,
    pub start_eval_at_iter: Option<usize>,
    pub eval_global_batch_size: Option<usize>,
    pub eval_micro_batch_size: Option<usize>,
    pub skip_train: bool,
    pub test_mode: bool,
    /// Every evaluation covers the whole validation set once (its natural size, one epoch),
    /// instead of `eval_iters` batches of an oversampled one.
    pub full_validation: bool,
    /// Each dataset of the validation split's blend (`dataset.blend_per_split[1]`) is
    /// evaluated on its own, with a loss of its own (`validation-<name>`); needs
    /// `full_validation`, as Megatron.
    pub multiple_validation_sets: bool,
    /// Names of those sets, in blend order (default: their index).
    pub validation_set_names: Option<Vec<String>>,
}
