//! `checkpoint.*`: where and when to save, what to load.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// `checkpoint.*` — Megatron-LM `CheckpointConfig` with Megatron Bridge's additions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Run directory to save into; None ⇒ never save.
    pub save: Option<String>,
    pub save_interval: Option<usize>,
    /// Keep only the k newest `iter_*` directories; -1 keeps all.
    #[default(-1)]
    pub most_recent_k: i64,
    #[default = true]
    pub save_optim: bool,
    #[default = true]
    pub save_rng: bool,
    /// Directory to resume from.
    pub load: Option<String>,
    #[default = true]
    pub load_optim: bool,
    pub load_main_params_from_ckpt: bool,
    #[default = true]
    pub load_rng: bool,
    /// Load weights only; iteration restarts at 0.
    pub finetune: bool,
    /// Weights source when `load` holds nothing: an mbridge checkpoint or a local HF directory.
    pub pretrained_checkpoint: Option<String>,
    pub ckpt_step: Option<usize>,
    pub exit_on_missing_checkpoint: bool,
    #[default = "torch_dist"]
    pub ckpt_format: String,
    #[default = true]
    pub fully_parallel_save: bool,
    pub async_save: bool,
    pub fully_parallel_load: bool,
    #[default = true]
    pub save_tokenizer_assets: bool,
    pub also_save_hf_checkpoint: bool,
    pub use_checkpoint_args: bool,
    pub non_persistent_save_interval: Option<usize>,
    pub verify_integrity: bool,
}
