//! `ddp.*`, `dist.*` and `comm_overlap.*`: how gradients and ranks are wired together.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// `ddp.*` — MCore `DistributedDataParallelConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct DdpConfig {
    /// Gradients of bf16 parameters are kept, summed and reduced in f32 (true) or bf16
    /// (`ops::main_grads`); set from `mixed_precision.grad_reduce_in_fp32`.
    pub grad_reduce_in_fp32: bool,
    pub overlap_grad_reduce: bool,
    pub overlap_param_gather: bool,
    pub align_param_gather: bool,
    pub use_distributed_optimizer: bool,
    #[default = 1]
    pub num_distributed_optimizer_instances: usize,
    pub check_for_nan_in_grad: bool,
    pub check_for_large_grads: bool,
    /// Elements per gradient bucket; None ⇒ automatic.
    pub bucket_size: Option<usize>,
    pub num_buckets: Option<usize>,
    pub pad_buckets_for_high_nccl_busbw: bool,
    pub average_in_collective: bool,
    pub fp8_param_gather: bool,
    pub use_megatron_fsdp: bool,
    #[default = "no_shard"]
    pub data_parallel_sharding_strategy: String,
    #[default = true]
    pub gradient_reduce_div_fusion: bool,
    // Parsed so Megatron Bridge configs load (`config::inert`).
    pub reduce_scatter_with_fp32_accumulation: bool,
    pub param_name_patterns_for_fp32_local_accumulation: Vec<String>,
    pub fp4_param_gather: bool,
    pub reuse_grad_buf_for_mxfp8_param_ag: bool,
    #[default = 1]
    pub megatron_fsdp_version: usize,
    #[default = "no_shard"]
    pub outer_dp_sharding_strategy: String,
    pub nccl_ub: bool,
    pub delay_wgrad_compute: bool,
}

/// Distributed backend (`dist.distributed_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistBackend {
    Nccl,
    Gloo,
}

/// `dist.*` — process-group initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    #[default(DistBackend::Nccl)]
    pub distributed_backend: DistBackend,
    #[default = 10]
    pub distributed_timeout_minutes: u64,
    #[default = true]
    pub align_grad_reduce: bool,
    pub lazy_mpu_init: bool,
    /// Rank order tp-cp-ep-dp-pp (false, Megatron's default) or tp-cp-ep-pp-dp (true).
    pub use_tp_pp_dp_mapping: bool,
    #[default = true]
    pub use_gloo_process_groups: bool,
    pub use_sharp: bool,
    pub external_gpu_device_mapping: bool,
    // Parsed so Megatron Bridge configs load (`config::inert`).
    /// The launcher's `LOCAL_RANK` is what counts; a value here is not used.
    pub local_rank: Option<usize>,
    pub use_megatron_fsdp: bool,
    pub use_torch_fsdp2: bool,
    pub nccl_communicator_config_path: Option<String>,
    pub sharp_enabled_group: Option<String>,
    pub high_priority_stream_groups: Vec<String>,
    pub distributed_timeout_seconds_after_init: Option<u64>,
    pub disable_jit_fuser: bool,
    pub enable_megatron_core_experimental: bool,
    pub use_decentralized_pg: bool,
    pub eval_context_parallel_size: Option<usize>,
}

/// `comm_overlap.*` — present only when a recipe tunes communication overlap; None = auto.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct CommOverlapConfig {
    pub tp_comm_overlap: bool,
    #[default = "nccl"]
    pub tp_comm_bootstrap_backend: String,
    pub overlap_p2p_comm: Option<bool>,
    pub batch_p2p_comm: Option<bool>,
    pub overlap_grad_reduce: Option<bool>,
    pub overlap_param_gather: Option<bool>,
    pub overlap_param_gather_with_optimizer_step: Option<bool>,
    pub align_param_gather: Option<bool>,
    pub bucket_size: Option<usize>,
    pub defer_embedding_wgrad_compute: Option<bool>,
    pub wgrad_deferral_limit: Option<usize>,
    pub delay_wgrad_compute: Option<bool>,
    pub tp_comm_overlap_cfg: Option<toml::Value>,
    /// Filled in by Megatron Bridge itself; mbridge derives the data-parallel size.
    pub data_parallel_size: Option<usize>,
}
