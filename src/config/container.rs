//! `ConfigContainer`: every section of a run, as Megatron Bridge's container holds them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::checkpoint::CheckpointConfig;
use super::dataset::DatasetConfig;
use super::logger::LoggerConfig;
use super::misc::{ProfilingConfig, RerunStateMachineConfig, RngConfig};
use super::mixed_precision::MixedPrecision;
use super::model::ModelConfig;
use super::optimizer::{OptimizerConfig, SchedulerConfig};
use super::parallel::{CommOverlapConfig, DdpConfig, DistConfig};
use super::peft::PeftConfig;
use super::tokenizer::TokenizerConfig;
use super::train::{TrainConfig, ValidationConfig};

/// The whole run configuration. Field order is the order `config show` prints sections in.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigContainer {
    /// A preset name such as "bf16_mixed", or a table; None ⇒ the model's own dtype fields.
    pub mixed_precision: Option<MixedPrecision>,
    pub train: TrainConfig,
    pub validation: ValidationConfig,
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub scheduler: SchedulerConfig,
    pub dataset: DatasetConfig,
    pub tokenizer: TokenizerConfig,
    pub checkpoint: CheckpointConfig,
    pub logger: LoggerConfig,
    pub ddp: DdpConfig,
    pub dist: DistConfig,
    pub rng: RngConfig,
    pub comm_overlap: Option<CommOverlapConfig>,
    pub peft: Option<PeftConfig>,
    pub profiling: ProfilingConfig,
    pub rerun_state_machine: RerunStateMachineConfig,
    /// Environment variables set (if not already set) before anything else runs.
    pub env_vars: BTreeMap<String, toml::Value>,
    /// Python hooks and Transformer Engine's tensor inspection: refused when set.
    pub optimizer_config_override_provider: Option<toml::Value>,
    pub tensor_inspect: Option<toml::Value>,
}
