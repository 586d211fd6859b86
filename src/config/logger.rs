//! `logger.*`: console log line cadence, TensorBoard and experiment trackers.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// The units `logger.runtime_time_unit` may name, with their length in seconds.
pub const RUNTIME_TIME_UNITS: [(&str, f64); 4] =
    [("seconds", 1.0), ("minutes", 60.0), ("hours", 3600.0), ("days", 86400.0)];

/// `logger.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct LoggerConfig {
    #[default = 100]
    pub log_interval: usize,
    pub log_params_norm: bool,
    pub log_throughput: bool,
    pub log_throughput_to_tensorboard: bool,
    #[default = 100]
    pub throughput_window_size: usize,
    pub log_progress: bool,
    pub timing_log_level: i64,
    #[default = "minmax"]
    pub timing_log_option: String,
    pub tensorboard_dir: Option<String>,
    /// mbridge addition: JSON-lines metrics file for scripts (one object per iteration and per
    /// evaluation, keys = TensorBoard tag names). Unset ⇒ `<tensorboard_dir>/metrics.jsonl`
    /// when `tensorboard_dir` is set, else no file.
    pub metrics_jsonl: Option<String>,
    #[default = 1]
    pub tensorboard_log_interval: usize,
    #[default = 1000]
    pub tensorboard_queue_size: usize,
    pub log_timers_to_tensorboard: bool,
    #[default = true]
    pub log_loss_scale_to_tensorboard: bool,
    pub log_validation_ppl_to_tensorboard: bool,
    pub log_memory_to_tensorboard: bool,
    pub log_l2_norm_grad_to_tensorboard: bool,
    pub log_num_zeros_in_grad: bool,
    pub log_world_size_to_tensorboard: bool,
    /// W&B project: mbridge writes TensorBoard files (requires `tensorboard_dir`) and prints
    /// the `wandb sync --sync-tensorboard` command that uploads them.
    pub wandb_project: Option<String>,
    pub wandb_exp_name: Option<String>,
    pub wandb_save_dir: Option<String>,
    pub wandb_entity: Option<String>,
    pub logging_level: Option<i64>,
    #[default = true]
    pub filter_warnings: bool,
    pub skip_train_metrics_log: bool,
    pub save_config_filepath: Option<String>,

    // ---- Parsed so Megatron Bridge configs load; `config::inert` lists which values mbridge
    // ---- refuses and which only tune Python logging or timers.
    pub memory_keys: Option<toml::Value>,
    pub log_memory_interval: Option<usize>,
    pub log_device_memory_used: bool,
    pub log_max_attention_logit: bool,
    pub log_runtime_to_tensorboard: bool,
    #[default = "hours"]
    pub runtime_time_unit: String,
    #[default = true]
    #[serde(rename = "barrier_with_L1_time")]
    pub barrier_with_l1_time: bool,
    pub modules_to_filter: Option<Vec<String>>,
    pub set_level_for_all_loggers: bool,
    pub log_energy: bool,
    pub mlflow_experiment: Option<String>,
    pub mlflow_run_name: Option<String>,
    pub mlflow_tracking_uri: Option<String>,
    pub mlflow_tags: Option<toml::Table>,
    pub mlflow_description: Option<String>,
    #[default = true]
    pub mlflow_log_artifacts: bool,
    pub comet_project: Option<String>,
    pub comet_experiment_name: Option<String>,
    pub comet_workspace: Option<String>,
    pub comet_api_key: Option<String>,
    pub comet_tags: Option<Vec<String>>,
}
