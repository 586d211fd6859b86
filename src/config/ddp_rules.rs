//! `ddp.*`, the optimizer's distributed-optimizer fields and the data-parallel part of
//! `comm_overlap.*`: [`apply`] syncs them and checks Megatron's rules at finalize time;
//! [`engine_unsupported`] lists what mbridge's engine cannot honour, for the trainer to refuse
//! (a config can still be shown and converted).

use super::container::ConfigContainer;

/// Syncs and checks the data-parallel settings for a run with `dp` data-parallel ranks.
pub fn apply(cfg: &mut ConfigContainer, dp: usize, errs: &mut Vec<String>) {
    // Megatron-LM's single `--use-distributed-optimizer` feeds both configs; either spelling
    // turns it on here and both are kept equal.
    let dist = cfg.ddp.use_distributed_optimizer || cfg.optimizer.use_distributed_optimizer;
    cfg.ddp.use_distributed_optimizer = dist;
    cfg.optimizer.use_distributed_optimizer = dist;
    if let Some(co) = cfg.comm_overlap.clone() {
        // Megatron Bridge's automatic choice with more than one DP rank: overlap the gradient
        // reduction (and the parameter gather of the distributed optimizer) in 128 Mi-element
        // buckets; explicit `comm_overlap.*` values win.
        let auto = dp > 1;
        cfg.ddp.overlap_grad_reduce = co.overlap_grad_reduce.unwrap_or(auto);
        cfg.ddp.overlap_param_gather = co.overlap_param_gather.unwrap_or(auto && dist);
        if let Some(a) = co.align_param_gather {
            cfg.ddp.align_param_gather = a;
        }
        match co.bucket_size {
            Some(b) => cfg.ddp.bucket_size = Some(b),
            None if auto && cfg.ddp.bucket_size.is_none() => {
                cfg.ddp.bucket_size = Some(128 * 1024 * 1024)
            }
            None => {}
        }
    }
    let gather = cfg.ddp.overlap_param_gather || cfg.optimizer.overlap_param_gather;
    cfg.ddp.overlap_param_gather = gather;
    cfg.optimizer.overlap_param_gather = gather;
    if gather && !dist {
        errs.push(
            "`ddp.overlap_param_gather` needs the distributed optimizer \
             (`ddp.use_distributed_optimizer=true`): only it gathers parameters"
                .into(),
        );
    }
    let d = &cfg.ddp;
    if d.average_in_collective && cfg.model.calculate_per_token_loss {
        errs.push(
            "`ddp.average_in_collective` cannot be combined with \
             `model.calculate_per_token_loss` (gradients are summed, then divided by the token \
             count)"
                .into(),
        );
    }
    if d.bucket_size == Some(0) {
        errs.push("`ddp.bucket_size` must be > 0 (got 0)".into());
    }
    if cfg.train.check_weight_hash_across_dp_replicas_interval == Some(0) {
        errs.push(
            "`train.check_weight_hash_across_dp_replicas_interval` must be > 0 (got 0)".into(),
        );
    }
}

/// Settings the engine cannot honour, one message per field; empty when the run can go on.
pub fn engine_unsupported(cfg: &ConfigContainer) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(co) = &cfg.comm_overlap {
        if co.tp_comm_overlap {
            errs.push(
                "`comm_overlap.tp_comm_overlap` = true: tensor-parallel communication overlap \
                 (Transformer Engine userbuffers) is not implemented; set it to false"
                    .into(),
            );
        }
        for (name, on) in [
            ("defer_embedding_wgrad_compute", co.defer_embedding_wgrad_compute),
            ("delay_wgrad_compute", co.delay_wgrad_compute),
            (
                "overlap_param_gather_with_optimizer_step",
                co.overlap_param_gather_with_optimizer_step,
            ),
        ] {
            if on == Some(true) {
                errs.push(format!(
                    "`comm_overlap.{name}` = true is not supported by mbridge's engine; unset it"
                ));
            }
        }
        if co.wgrad_deferral_limit.is_some_and(|l| l > 0) {
            errs.push(
                "`comm_overlap.wgrad_deferral_limit` needs deferred embedding wgrad, which is \
                 not supported; unset it"
                    .into(),
            );
        }
    }
    if cfg.optimizer.overlap_param_gather_with_optimizer_step {
        errs.push(
            "`optimizer.overlap_param_gather_with_optimizer_step` is not supported by mbridge's \
             engine (parameters are gathered right after the step); set it to false"
                .into(),
        );
    }
    match cfg.model.cp_comm_type.as_deref() {
        None | Some("all_gather") => {}
        Some(other) => errs.push(format!(
            "`model.cp_comm_type` = {other:?}: mbridge's context parallelism all-gathers keys and \
             values (\"all_gather\", the same arithmetic as the other kinds); set it to \
             \"all_gather\" or unset it"
        )),
    }
    let d = &cfg.ddp;
    if d.num_buckets.is_some() {
        errs.push(
            "`ddp.num_buckets` is not supported; size buckets with `ddp.bucket_size` (elements)"
                .into(),
        );
    }
    if d.num_distributed_optimizer_instances != 1 {
        errs.push(format!(
            "`ddp.num_distributed_optimizer_instances` = {}: only 1 (optimizer state sharded \
             over the whole data-parallel group) is implemented",
            d.num_distributed_optimizer_instances
        ));
    }
    if d.use_megatron_fsdp {
        errs.push(format!(
            "Megatron FSDP (`ddp.use_megatron_fsdp`, `ddp.data_parallel_sharding_strategy` = \
             {:?}) is not implemented; use `ddp.use_distributed_optimizer` for sharded optimizer \
             state",
            d.data_parallel_sharding_strategy
        ));
    }
    if d.check_for_large_grads {
        errs.push("`ddp.check_for_large_grads` (rerun state machine) is not implemented".into());
    }
    errs
}
