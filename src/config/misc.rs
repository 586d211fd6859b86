//! Small sections: `rng.*`, `profiling.*`, `rerun_state_machine.*`.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// `rng.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct RngConfig {
    #[default = 1234]
    pub seed: u64,
    pub te_rng_tracker: bool,
    pub inference_rng_tracker: bool,
    pub data_parallel_random_init: bool,
}

/// `profiling.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilingConfig {
    pub use_nsys_profiler: bool,
    pub use_pytorch_profiler: bool,
    #[default = 10]
    pub profile_step_start: usize,
    #[default = 12]
    pub profile_step_end: usize,
    #[default(vec![0])]
    pub profile_ranks: Vec<usize>,
    pub record_memory_history: bool,
    pub record_shapes: bool,
    pub nvtx_ranges: bool,
}

/// `rerun_state_machine.*` — what to do about NaN or spiky losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct RerunStateMachineConfig {
    /// "disabled" | "validate_results" | "report_stats".
    #[default = "disabled"]
    pub rerun_mode: String,
    #[default = true]
    pub check_for_nan_in_loss: bool,
    pub check_for_spiky_loss: bool,
    #[default = 10.0]
    pub spiky_loss_factor: f64,
}
