//! `train_state.json`: where a run stands (Megatron Bridge's `TrainState`).

use serde::{Deserialize, Serialize};

/// Progress of a run; saved in every checkpoint and as `latest_train_state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Completed iterations.
    pub step: u64,
    pub consumed_train_samples: u64,
    pub skipped_train_samples: u64,
    pub consumed_valid_samples: u64,
    pub floating_point_operations_so_far: f64,
    pub do_train: bool,
    pub do_valid: bool,
    pub do_test: bool,
    /// fp16 runs with a dynamic loss scale: where the scaler stands (absent otherwise, and in
    /// checkpoints written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<GradScalerState>,
}

/// What a checkpoint keeps of a dynamic scaler (megatron-core's `state_dict`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradScalerState {
    pub scale: f64,
    pub growth_tracker: usize,
    pub hysteresis_tracker: usize,
}
