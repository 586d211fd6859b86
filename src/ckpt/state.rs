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
}
