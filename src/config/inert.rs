//! Megatron Bridge fields that mbridge parses, so that its configs load unchanged, but does not
//! act on. Two kinds, data-driven:
//!
//! - [`REFUSED`]: a value other than the default would change the run (what is saved, logged,
//!   trained or tokenized), so the trainer refuses it instead of silently doing something else
//!   ([`engine_unsupported`]).
//! - [`HINTS`]: tuning knobs of PyTorch, Transformer Engine or Megatron machinery that mbridge
//!   does not have (data-loader workers, fusion switches, communication back-ends, Python
//!   garbage collection). They cannot change the results, so any value is accepted; a value
//!   other than the default is named in the debug log ([`ignored_hints`]).
//!
//! Fields with rules of their own live with them (`ddp_rules`, `optimizer_rules`).

use serde_json::Value;

use super::container::ConfigContainer;

/// Fields whose non-default values mbridge cannot honour, with what is missing.
pub const REFUSED: &[(&str, &str)] = &[
    ("checkpoint.ckpt_format", "mbridge writes its own sharded safetensors format (loaded by `checkpoint.load` and `mbridge export-hf`), not the other formats"),
    ("checkpoint.load_main_params_from_ckpt", "loading fp32 main parameters as the model weights is not implemented"),
    ("checkpoint.verify_integrity", "checkpoint integrity verification is not implemented"),
    ("logger.log_l2_norm_grad_to_tensorboard", "per-parameter gradient norms are not logged"),
    ("rerun_state_machine.rerun_mode", "the rerun state machine is not implemented"),
    ("mixed_precision.autocast_enabled", "autocast is not implemented; parameters and compute share `params_dtype`"),
    ("model.fp32_residual_connection", "the residual stream stays in the parameters' dtype"),
    ("peft.lora_dtype", "adapters take the base model's dtype"),
    ("tokenizer.force_system_message", "chat templates are applied as written"),
    ("tokenizer.null_tokenizer_eod_id", "the null tokenizer's end-of-document id is its vocabulary size"),
    ("tokenizer.tokenizer_hf_no_include_special_tokens", "special tokens are always part of a Hugging Face tokenizer's vocabulary"),
    ("tokenizer.vocab_extra_ids", "extra sentinel ids are not added to the vocabulary"),
    ("train.decrease_batch_size_if_needed", "the batch size never changes during a run"),
    ("validation.test_mode", "test mode is not implemented"),
    ("train.step_batch_size_schedule", "the batch size never changes during a run"),
    ("scheduler.no_weight_decay_cond_type", "weight decay skips 1-D parameters and biases (Megatron's default rule)"),
    ("checkpoint.save_params_interval", "parameter dumps for debugging are not implemented"),
    ("checkpoint.save_activations_interval", "activation dumps for debugging are not implemented"),
    ("checkpoint.save_wgrads_interval", "weight-gradient dumps for debugging are not implemented"),
    ("checkpoint.save_dgrads_interval", "data-gradient dumps for debugging are not implemented"),
    ("checkpoint.ckpt_convert_format", "checkpoint format conversion is not implemented; `mbridge export-hf` writes Hugging Face checkpoints"),
    ("checkpoint.ckpt_convert_save", "checkpoint format conversion is not implemented; `mbridge export-hf` writes Hugging Face checkpoints"),
    ("checkpoint.custom_manager_class", "checkpoint managers are Python classes; mbridge has its own"),
    ("checkpoint.hf_source_path", "the Hugging Face copy's config comes from the model's own settings (`mbridge export-hf`)"),
    ("checkpoint.hf_trust_remote_code", "mbridge runs no remote code"),
    ("logger.memory_keys", "memory statistics by key are not logged"),
    ("logger.log_memory_interval", "memory statistics are not logged at their own interval"),
    ("logger.log_device_memory_used", "device memory use (NVML) is not logged"),
    ("logger.log_max_attention_logit", "the largest attention logit is not logged"),
    ("logger.log_energy", "energy is not measured"),
    ("logger.mlflow_experiment", "MLflow is not supported; TensorBoard files (`logger.tensorboard_dir`) and `metrics.jsonl` are written"),
    ("logger.mlflow_run_name", "MLflow is not supported"),
    ("logger.mlflow_tracking_uri", "MLflow is not supported"),
    ("logger.mlflow_tags", "MLflow is not supported"),
    ("logger.mlflow_description", "MLflow is not supported"),
    ("logger.comet_project", "Comet is not supported; TensorBoard files (`logger.tensorboard_dir`) and `metrics.jsonl` are written"),
    ("logger.comet_experiment_name", "Comet is not supported"),
    ("logger.comet_workspace", "Comet is not supported"),
    ("logger.comet_api_key", "Comet is not supported"),
    ("logger.comet_tags", "Comet is not supported"),
    ("dist.use_megatron_fsdp", "FSDP is not implemented; `ddp.use_distributed_optimizer` shards the optimizer state"),
    ("dist.use_torch_fsdp2", "FSDP is not implemented; `ddp.use_distributed_optimizer` shards the optimizer state"),
    ("dist.eval_context_parallel_size", "evaluation runs with the training's context parallelism"),
    ("rerun_state_machine.error_injection_rate", "the rerun state machine (and its error injection) is not implemented"),
    ("ddp.reduce_scatter_with_fp32_accumulation", "gradients are reduced in `ddp.grad_reduce_in_fp32`'s dtype"),
    ("ddp.param_name_patterns_for_fp32_local_accumulation", "gradients are reduced in `ddp.grad_reduce_in_fp32`'s dtype"),
    ("ddp.fp4_param_gather", "FP4 is not implemented"),
    ("ddp.reuse_grad_buf_for_mxfp8_param_ag", "MXFP8 is not implemented"),
    ("ddp.outer_dp_sharding_strategy", "hybrid-sharded data parallelism is not implemented"),
    ("optimizer.use_layer_wise_distributed_optimizer", "the layer-wise distributed optimizer is not implemented; `ddp.use_distributed_optimizer` shards the optimizer state"),
    ("dataset.inter_document_masking", "use `dataset.reset_attention_mask` for attention within documents"),
    ("dataset.trust_remote_code", "mbridge runs no remote code"),
    ("dataset.dataloader_save", "data loader states are not saved; the samplers resume from the consumed sample counts"),
    ("dataset.dataloader_load", "data loader states are not loaded; the samplers resume from the consumed sample counts"),
    ("dataset.hf_dataset", "Hugging Face Hub datasets are not downloaded; write them as JSONL under `dataset.dataset_root`"),
    ("dataset.hf_validation_dataset", "Hugging Face Hub datasets are not downloaded; write them as JSONL under `dataset.dataset_root`"),
    ("dataset.hf_test_dataset", "Hugging Face Hub datasets are not downloaded; write them as JSONL under `dataset.dataset_root`"),
    ("dataset.hf_output_root", "Hugging Face Hub datasets are not downloaded"),
    ("dataset.hf_validation_proportion", "Hugging Face Hub datasets are not downloaded"),
    ("dataset.hf_rewrite", "Hugging Face Hub datasets are not downloaded"),
    ("dataset.enable_offline_packing", "offline packing is not implemented; `dataset.packed_sequence_specs` packs at preparation time"),
    ("dataset.offline_packing_specs", "offline packing is not implemented; `dataset.packed_sequence_specs` packs at preparation time"),
    ("tokenizer.padded_vocab_size", "the padded vocabulary follows `model.make_vocab_size_divisible_by` and TP"),
    ("tokenizer.pad_vocab_size", "the vocabulary is padded as `model.make_vocab_size_divisible_by` says"),
    ("tokenizer.metadata_path", "multimodal tokenizer metadata is not supported"),
    ("tokenizer.tokenizer_sentencepiece_legacy", "SentencePiece tokenizers are not supported"),
    ("tokenizer.trust_remote_code", "mbridge runs no remote code"),
    ("tokenizer.null_tokenizer_pad_id", "the null tokenizer has no pad id"),
    ("tokenizer.hf_tokenizer_kwargs", "Hugging Face tokenizers load from tokenizer.json as they are"),
    ("tokenizer.sp_tokenizer_kwargs", "SentencePiece tokenizers are not supported"),
    ("tokenizer.tokenizer_prompt_format", "prompt formats are not supported; use `tokenizer.chat_template`"),
    ("mixed_precision.fp8_dot_product_attention", "attention runs in bf16/fp16; FP8 covers the linear layers"),
    ("mixed_precision.fp8_multi_head_attention", "attention runs in bf16/fp16; FP8 covers the linear layers"),
    ("mixed_precision.fp4_param", "FP4 is not implemented"),
    ("mixed_precision.fp4_param_gather", "FP4 is not implemented"),
    ("mixed_precision.reuse_grad_buf_for_mxfp8_param_ag", "MXFP8 is not implemented"),
    ("model.fp16_lm_cross_entropy", "the cross entropy runs in fp32 over the logits"),
    ("model.logit_dtype", "the logits take the compute dtype"),
    ("model.rotary_scaling_factor", "this RoPE scaling factor belongs to multi-latent attention, which is not implemented"),
    ("model.mtp_enabled", "multi-token prediction is not implemented"),
    ("model.restore_modelopt_state", "ModelOpt states are not supported"),
    ("model.use_arbitrary_attention_mask", "attention masks are causal (with `dataset.reset_attention_mask` per document)"),
    ("model.qk_l2_norm", "L2 normalization of queries and keys is not implemented"),
    ("model.attention_output_gate", "gated attention output (Qwen3-Next) is not implemented"),
    ("model.apply_query_key_layer_scaling", "query-key layer scaling is not implemented"),
    ("model.hierarchical_context_parallel_sizes", "hierarchical context parallelism is not implemented"),
    ("model.multi_latent_attention", "multi-latent attention (DeepSeek) is not implemented"),
    ("model.q_lora_rank", "multi-latent attention (DeepSeek) is not implemented"),
    ("model.kv_lora_rank", "multi-latent attention (DeepSeek) is not implemented"),
    ("model.qk_head_dim", "multi-latent attention (DeepSeek) is not implemented"),
    ("model.qk_pos_emb_head_dim", "multi-latent attention (DeepSeek) is not implemented"),
    ("model.v_head_dim", "multi-latent attention (DeepSeek) is not implemented"),
    ("model.rope_type", "multi-latent attention (DeepSeek) is not implemented"),
    ("model.mamba_state_dim", "hybrid Mamba models are not implemented"),
    ("model.mamba_head_dim", "hybrid Mamba models are not implemented"),
    ("model.mamba_num_groups", "hybrid Mamba models are not implemented"),
    ("model.mamba_num_heads", "hybrid Mamba models are not implemented"),
    ("model.hybrid_layer_pattern", "hybrid Mamba models are not implemented"),
    ("optimizer_config_override_provider", "optimizer overrides are Python callables; set `optimizer.*` fields"),
    ("tensor_inspect", "Transformer Engine's tensor inspection is not supported"),
];

/// Fields accepted with any value because they only tune machinery mbridge does not have.
pub const HINTS: &[(&str, &str)] = &[
    ("checkpoint.fully_parallel_load", "every rank reads its own shards"),
    ("checkpoint.fully_parallel_save", "every rank writes its own shards"),
    ("dataset.create_attention_mask", "causal masks are built inside attention"),
    ("dataset.memmap_workers", "no data-loader workers"),
    ("dataset.num_dataset_builder_threads", "no data-loader workers"),
    ("dataset.num_workers", "no data-loader workers"),
    ("dataset.persistent_workers", "no data-loader workers"),
    ("dataset.pin_memory", "batches are copied straight to the device"),
    ("logger.filter_warnings", "Python warnings"),
    ("logger.logging_level", "Python logging; use RUST_LOG"),
    ("logger.tensorboard_queue_size", "event files are written synchronously"),
    ("logger.throughput_window_size", "throughput is over the log interval"),
    ("logger.timing_log_level", "Megatron timers; RUST_LOG=mbridge=debug prints mbridge's phases"),
    ("logger.timing_log_option", "Megatron timers"),
    ("logger.wandb_exp_name", "runs are uploaded with `wandb sync` (see `logger.wandb_project`)"),
    ("logger.wandb_save_dir", "runs are uploaded with `wandb sync` (see `logger.wandb_project`)"),
    ("model.apply_rope_fusion", "mbridge's kernels are always fused"),
    ("model.bias_activation_fusion", "mbridge's kernels are always fused"),
    ("model.bias_dropout_fusion", "mbridge's kernels are always fused"),
    ("model.cross_entropy_loss_fusion", "mbridge's kernels are always fused"),
    ("model.masked_softmax_fusion", "mbridge's kernels are always fused"),
    ("model.persist_layer_norm", "mbridge's kernels are always fused"),
    ("dist.align_grad_reduce", "NCCL process groups"),
    ("ddp.gradient_reduce_div_fusion", "NCCL process groups"),
    ("dist.external_gpu_device_mapping", "NCCL process groups"),
    ("dist.lazy_mpu_init", "NCCL process groups"),
    ("dist.use_gloo_process_groups", "CPU tensors use mbridge's TCP back-end"),
    ("dist.use_sharp", "NCCL process groups"),
    ("comm_overlap.batch_p2p_comm", "pipeline send/receive"),
    ("comm_overlap.overlap_p2p_comm", "pipeline send/receive"),
    ("comm_overlap.tp_comm_bootstrap_backend", "no userbuffers"),
    ("rng.data_parallel_random_init", "every replica trains from DP rank 0's weights, as Megatron's broadcast leaves them, and dropout already draws a stream per micro-batch"),
    ("rng.inference_rng_tracker", "one CUDA RNG stream"),
    ("rng.te_rng_tracker", "one CUDA RNG stream"),
    ("optimizer.optimizer_offload_fraction", "only used with optimizer CPU offload"),
    ("tokenizer.tokenizer_hf_no_use_fast", "one (Rust) tokenizer implementation"),
    ("train.check_optimizer_step_success", "the step fails loudly"),
    ("train.empty_unused_memory_level", "the CUDA memory pool is candle's"),
    ("train.manual_gc", "no Python garbage collector"),
    ("train.manual_gc_eval", "no Python garbage collector"),
    ("train.manual_gc_interval", "no Python garbage collector"),
    ("train.train_sync_interval", "the host waits only where it reads a value"),
    ("train.gpu_sniff_test_interval", "no GPU sniff test"),
    ("train.skip_sync_grad_norm_across_mp", "the reported gradient norm is already the global one on every model-parallel rank"),
    ("train.exit_signal_handler_for_dataloader", "`train.exit_signal_handler` covers the whole run"),
    ("train.exit_signal_handler_for_training", "`train.exit_signal_handler` covers the whole run"),
    ("checkpoint.non_persistent_local_ckpt_dir", "only for local non-persistent checkpoints, which are refused"),
    ("checkpoint.non_persistent_local_ckpt_algo", "only for local non-persistent checkpoints, which are refused"),
    ("checkpoint.replication", "only for local non-persistent checkpoints, which are refused"),
    ("checkpoint.replication_jump", "only for local non-persistent checkpoints, which are refused"),
    ("checkpoint.replication_factor", "only for local non-persistent checkpoints, which are refused"),
    ("checkpoint.auto_detect_ckpt_format", "mbridge reads its one checkpoint format"),
    ("checkpoint.async_ckpt_cpu_priority", "one background writer thread"),
    ("checkpoint.async_ckpt_io_priority", "one background writer thread"),
    ("checkpoint.async_ckpt_use_cpu_shm", "one background writer thread"),
    ("checkpoint.async_strategy", "one background writer thread"),
    ("checkpoint.async_write_results_mp_mode", "one background writer thread"),
    ("checkpoint.use_persistent_ckpt_worker", "one background writer thread"),
    ("checkpoint.storage_writers_per_rank", "every rank writes its own shards"),
    ("checkpoint.dist_ckpt_workers", "every rank writes its own shards"),
    ("checkpoint.ckpt_fully_parallel_load_exchange_algo", "every rank reads its own shards"),
    ("checkpoint.ckpt_assume_constant_structure", "mbridge's shard index is written with each checkpoint"),
    ("checkpoint.ckpt_load_validate_sharding_integrity", "loading checks every tensor's shape against the model"),
    ("checkpoint.dist_ckpt_strictness", "loading fails on a missing tensor or a shape mismatch"),
    ("checkpoint.dist_ckpt_save_pre_mcore_014", "mbridge's own sharded format"),
    ("checkpoint.dist_ckpt_optim_fully_reshardable", "mbridge's own sharded format"),
    ("checkpoint.distrib_optim_fully_reshardable_mem_efficient", "mbridge's own sharded format"),
    ("checkpoint.strict_fsdp_dtensor_load", "the fsdp_dtensor format is not used"),
    ("checkpoint.hf_distributed_save", "the committing rank writes the Hugging Face copy"),
    ("checkpoint.hf_save_every_n_ranks", "the committing rank writes the Hugging Face copy"),
    ("logger.barrier_with_L1_time", "Megatron timers"),
    ("logger.modules_to_filter", "Python logging; use RUST_LOG"),
    ("logger.set_level_for_all_loggers", "Python logging; use RUST_LOG"),
    ("logger.mlflow_log_artifacts", "MLflow is not supported"),
    ("dist.local_rank", "the launcher's LOCAL_RANK is read"),
    ("dist.nccl_communicator_config_path", "NCCL process groups"),
    ("dist.sharp_enabled_group", "NCCL process groups"),
    ("dist.high_priority_stream_groups", "NCCL process groups"),
    ("dist.distributed_timeout_seconds_after_init", "NCCL process groups"),
    ("dist.disable_jit_fuser", "no PyTorch JIT"),
    ("dist.enable_megatron_core_experimental", "megatron-core's experimental features"),
    ("dist.use_decentralized_pg", "NCCL process groups"),
    ("profiling.pytorch_profiler_collect_shapes", "the Chrome trace records mbridge's phases"),
    ("profiling.pytorch_profiler_collect_callstack", "the Chrome trace records mbridge's phases"),
    ("profiling.pytorch_profiler_collect_chakra", "the Chrome trace records mbridge's phases"),
    ("rerun_state_machine.error_injection_type", "the rerun state machine is not implemented"),
    ("ddp.megatron_fsdp_version", "FSDP is not implemented"),
    ("ddp.nccl_ub", "NCCL process groups"),
    ("ddp.delay_wgrad_compute", "weight gradients are computed in the layer's backward"),
    ("optimizer.optimizer_cuda_graph", "no CUDA graphs"),
    ("dataset.allow_ambiguous_pad_tokens", "pad positions are masked out of the loss"),
    ("dataset.fast_cache_load", "index caches are read as written"),
    ("dataset.defer_npy_index_mmap", "index caches are read as written"),
    ("dataset.data_parallel_size", "the data-parallel size comes from the world"),
    ("dataset.context_parallel_size", "the context-parallel size comes from `model.context_parallel_size`"),
    ("dataset.sequences_per_dataset", "sequence counts are read from the .idx files"),
    ("dataset.per_dataset_sequences_path", "sequence counts are read from the .idx files"),
    ("dataset.skip_getting_attention_mask_from_dataset", "causal masks are built inside attention"),
    ("dataset.packed_sequence_specs.num_tokenizer_workers", "packing tokenizes on one thread"),
    ("tokenizer.tiktoken_pattern", "only used by TikTokenizer, which mbridge does not support"),
    ("tokenizer.tiktoken_num_special_tokens", "only used by TikTokenizer, which mbridge does not support"),
    ("tokenizer.make_vocab_size_divisible_by", "Megatron Bridge keeps it neutral; the model pads the vocabulary"),
    ("tokenizer.tensor_model_parallel_size", "Megatron Bridge keeps it neutral; the model pads the vocabulary"),
    ("tokenizer.rank", "one tokenizer per process"),
    ("mixed_precision.fp4_recipe", "FP4 is not implemented"),
    ("comm_overlap.tp_comm_overlap_cfg", "no userbuffers"),
    ("comm_overlap.data_parallel_size", "the data-parallel size comes from the world"),
    ("peft.sequence_parallel_input_regather", "adapters read the layer's gathered input"),
    ("peft.a2a_experimental", "only for mixture-of-experts adapters"),
    ("model.parallel_output", "the loss is computed from vocabulary-parallel logits either way"),
    ("model.deallocate_pipeline_outputs", "pipeline stages free what they send"),
    ("model.scatter_embedding_sequence_parallel", "the embedding output is scattered under sequence parallelism"),
    ("model.tp_only_amax_red", "FP8 scales are reduced where the tensor is split"),
    ("model.tp_comm_overlap_cfg", "no userbuffers"),
    ("model.use_transformer_engine_full_layer_spec", "mbridge has one layer implementation"),
    ("model.use_transformer_engine_op_fuser", "mbridge has one layer implementation"),
    ("model.dense_grouped_gemm", "mbridge has one layer implementation"),
    ("model.transformer_layer_spec", "mbridge has one layer implementation"),
    ("model.transformer_impl", "mbridge has one layer implementation"),
    ("model.cuda_graph_impl", "no CUDA graphs"),
    ("model.hf_model_revision", "Hugging Face files are read from local directories"),
    ("model.init_model_with_meta_device", "weights are initialized on their device"),
    ("model.use_te_rng_tracker", "one CUDA RNG stream"),
    ("model.mtp_loss_scaling_factor", "only used with multi-token prediction, which is refused"),
];

/// The value at a dotted path of `tree`; None when a section on the way is absent.
fn at<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(tree, |v, k| v.get(k))
}

/// `(path, value, default)` of every listed field whose value differs from its default.
fn changed<'a>(
    cfg: &ConfigContainer,
    list: &'a [(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str, Value, Value)> {
    let tree = serde_json::to_value(cfg).expect("configs serialize");
    let defaults = super::schema::schema();
    list.iter()
        .filter_map(|&(path, why)| {
            let got = at(&tree, path)?;
            let default = at(defaults, path).cloned().unwrap_or(Value::Null);
            (*got != default).then(|| (path, why, got.clone(), default))
        })
        .collect()
}

/// One message per [`REFUSED`] field set away from its default.
pub fn engine_unsupported(cfg: &ConfigContainer) -> Vec<String> {
    changed(cfg, REFUSED)
        .into_iter()
        .map(|(path, why, got, default)| {
            format!("`{path}` = {got}: {why}; leave it at its default ({default})")
        })
        .collect()
}

/// One line per [`HINTS`] field set away from its default, for the log.
pub fn ignored_hints(cfg: &ConfigContainer) -> Vec<String> {
    changed(cfg, HINTS)
        .into_iter()
        .map(|(path, why, got, _)| format!("`{path}` = {got} has no effect in mbridge ({why})"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema;

    /// Every listed path exists in the config (a renamed field would silently drop its check).
    #[test]
    fn every_listed_field_exists() {
        for (path, _) in REFUSED.iter().chain(HINTS) {
            let keys: Vec<&str> = path.split('.').collect();
            assert!(schema::lookup(&keys).is_some(), "{path} is not a config field");
        }
    }

    #[test]
    fn defaults_pass_and_changed_values_are_named() {
        let mut cfg = ConfigContainer::default();
        assert!(engine_unsupported(&cfg).is_empty());
        assert!(ignored_hints(&cfg).is_empty());
        cfg.checkpoint.ckpt_format = "zarr".into();
        cfg.validation.test_mode = true;
        cfg.model.bias_activation_fusion = !cfg.model.bias_activation_fusion;
        let errs = engine_unsupported(&cfg);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("`checkpoint.ckpt_format` = \"zarr\""), "{errs:?}");
        assert!(errs[0].contains("(\"torch_dist\")"), "{errs:?}");
        assert!(errs[1].starts_with("`validation.test_mode` = true"), "{errs:?}");
        let hints = ignored_hints(&cfg);
        assert_eq!(hints.len(), 1, "{hints:?}");
        assert!(hints[0].contains("model.bias_activation_fusion"), "{hints:?}");
    }

    /// Absent optional sections are not compared; present ones are.
    #[test]
    fn optional_sections_are_checked_only_when_present() {
        let mut cfg = ConfigContainer::default();
        assert!(cfg.peft.is_none());
        assert!(engine_unsupported(&cfg).is_empty());
        cfg.peft = Some(crate::config::peft::PeftConfig {
            lora_dtype: Some(crate::config::model::DType::BF16),
            ..Default::default()
        });
        let errs = engine_unsupported(&cfg);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("peft.lora_dtype"), "{errs:?}");
    }
}
