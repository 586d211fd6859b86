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
    ("logger.save_config_filepath", "the config is not saved there; `mbridge config show` prints it, and checkpoints keep run_config.toml"),
    ("rerun_state_machine.check_for_spiky_loss", "the rerun state machine is not implemented"),
    ("rerun_state_machine.rerun_mode", "the rerun state machine is not implemented"),
    ("mixed_precision.autocast_enabled", "autocast is not implemented; parameters and compute share `params_dtype`"),
    ("model.fp32_residual_connection", "the residual stream stays in the parameters' dtype"),
    ("peft.lora_dtype", "adapters take the base model's dtype"),
    ("tokenizer.force_system_message", "chat templates are applied as written"),
    ("tokenizer.null_tokenizer_eod_id", "the null tokenizer's end-of-document id is its vocabulary size"),
    ("tokenizer.tokenizer_hf_no_include_special_tokens", "special tokens are always part of a Hugging Face tokenizer's vocabulary"),
    ("tokenizer.vocab_extra_ids", "extra sentinel ids are not added to the vocabulary"),
    ("train.decrease_batch_size_if_needed", "the batch size never changes during a run"),
    ("validation.full_validation", "validation runs `validation.eval_iters` batches"),
    ("train.skip_sync_grad_norm_across_mp", "the gradient norm is always summed over model-parallel ranks"),
    ("validation.test_mode", "test mode is not implemented"),
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
    ("rerun_state_machine.spiky_loss_factor", "the rerun state machine is not implemented"),
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
