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

/// `profiling.*` (what each does: `crate::profiling`). The window is the steps whose 0-based
/// index `s` (iterations done before the step) lies in `[profile_step_start, profile_step_end)`,
/// i.e. the log's iterations `start + 1 ..= end`, as Megatron Bridge's nsys start/stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilingConfig {
    /// Start/stop the CUDA profiler around the window and emit NVTX ranges in it (CUDA builds).
    pub use_nsys_profiler: bool,
    /// mbridge's stand-in for the PyTorch profiler: a Chrome trace of the window's phases.
    pub use_pytorch_profiler: bool,
    #[default = 10]
    pub profile_step_start: usize,
    #[default = 12]
    pub profile_step_end: usize,
    /// Global ranks to profile; empty = every rank for the profilers but none for the memory
    /// report (Megatron Bridge's two different membership checks).
    #[default(vec![0])]
    pub profile_ranks: Vec<usize>,
    /// Write a memory report at the end of the window (JSON, not PyTorch's pickle).
    pub record_memory_history: bool,
    /// Where the memory report goes; `_<rank>` is inserted before the extension and a
    /// `.pickle`/`.pkl` extension becomes `.json`. Megatron Bridge's default.
    #[default = "/nemo_run/snapshot.pickle"]
    pub memory_snapshot_path: String,
    pub record_shapes: bool,
    /// NVTX ranges on every step of the profiled ranks, not only inside the nsys window.
    pub nvtx_ranges: bool,
    pub pytorch_profiler_collect_shapes: bool,
    pub pytorch_profiler_collect_callstack: bool,
    pub pytorch_profiler_collect_chakra: bool,
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
    pub error_injection_rate: u64,
    #[default = "transient_error"]
    pub error_injection_type: String,
}
