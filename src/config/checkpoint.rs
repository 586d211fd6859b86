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
    /// Save a non-persistent checkpoint every this many iterations (where no persistent one
    /// is saved): `non_persistent_ckpt_type = "global"`.
    pub non_persistent_save_interval: Option<usize>,
    /// `"global"`: a checkpoint in [`Self::non_persistent_dir`] of which only the two newest are
    /// kept, loaded instead of the persistent one when newer. Megatron's `"local"` and
    /// `"in_memory"` (NVRx) are refused.
    pub non_persistent_ckpt_type: Option<String>,
    /// Where global non-persistent checkpoints go (default `<save>/non_persistent`).
    pub non_persistent_global_ckpt_dir: Option<String>,
    pub verify_integrity: bool,
}

/// Megatron's subdirectory of the save directory for global non-persistent checkpoints.
pub const NON_PERSISTENT_SUBDIR: &str = "non_persistent";

impl CheckpointConfig {
    /// The directory of global non-persistent checkpoints for a run saving to or loading from
    /// `base`: `non_persistent_global_ckpt_dir`, else `<base>/non_persistent`; None when
    /// non-persistent checkpoints are not global.
    pub fn non_persistent_dir(&self, base: Option<&str>) -> Option<std::path::PathBuf> {
        if self.non_persistent_ckpt_type.as_deref() != Some("global") {
            return None;
        }
        match (&self.non_persistent_global_ckpt_dir, base) {
            (Some(dir), _) => Some(dir.into()),
            (None, Some(base)) => Some(std::path::Path::new(base).join(NON_PERSISTENT_SUBDIR)),
            (None, None) => None,
        }
    }
}
