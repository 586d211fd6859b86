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
    /// With periodic saves: a newer checkpoint replaces the previous one unless that one's
    /// iteration is a multiple of this (Megatron's retained checkpoints).
    pub save_retain_interval: Option<usize>,
    /// With `use_checkpoint_args`: the tokenizer (`tokenizer_type`, `tokenizer_model`) also
    /// comes from the checkpoint, as Megatron's default does.
    #[default = true]
    pub use_tokenizer_model_from_checkpoint_args: bool,
    /// With `use_checkpoint_args`: the model parallelism (TP, PP, virtual PP, EP) also comes
    /// from the checkpoint.
    pub use_mp_args_from_checkpoint_args: bool,

    // ---- Parsed so Megatron Bridge configs load; `config::inert` lists which values mbridge
    // ---- refuses and which only tune checkpoint machinery it does not have.
    pub save_params_interval: Option<usize>,
    pub save_activations_interval: Option<usize>,
    pub save_wgrads_interval: Option<usize>,
    pub save_dgrads_interval: Option<usize>,
    pub non_persistent_local_ckpt_dir: Option<String>,
    #[default = "fully_parallel"]
    pub non_persistent_local_ckpt_algo: String,
    pub auto_detect_ckpt_format: bool,
    pub ckpt_convert_format: Option<String>,
    pub ckpt_convert_save: Option<String>,
    #[default = 10]
    pub async_ckpt_cpu_priority: i64,
    #[default = 3]
    pub async_ckpt_io_priority: i64,
    pub async_ckpt_use_cpu_shm: bool,
    #[default = "broadcast"]
    pub ckpt_fully_parallel_load_exchange_algo: String,
    pub ckpt_assume_constant_structure: bool,
    #[default = true]
    pub ckpt_load_validate_sharding_integrity: bool,
    #[default = "assume_ok_unexpected"]
    pub dist_ckpt_strictness: String,
    pub dist_ckpt_save_pre_mcore_014: bool,
    pub dist_ckpt_optim_fully_reshardable: bool,
    pub distrib_optim_fully_reshardable_mem_efficient: bool,
    pub replication: bool,
    pub replication_jump: Option<usize>,
    #[default = 2]
    pub replication_factor: usize,
    #[default = 1]
    pub storage_writers_per_rank: usize,
    #[default = true]
    pub use_persistent_ckpt_worker: bool,
    #[default = "nvrx"]
    pub async_strategy: String,
    #[default = "fork"]
    pub async_write_results_mp_mode: String,
    pub strict_fsdp_dtensor_load: bool,
    pub custom_manager_class: Option<String>,
    #[default = 1]
    pub dist_ckpt_workers: usize,
    pub hf_source_path: Option<String>,
    pub hf_trust_remote_code: bool,
    pub hf_distributed_save: bool,
    #[default = 1]
    pub hf_save_every_n_ranks: usize,
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
