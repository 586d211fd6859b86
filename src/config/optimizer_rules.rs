//! `optimizer.*` rules beyond single fields: megatron-core's `OptimizerConfig.__post_init__`
//! checks ([`apply`], at finalize time) and what mbridge's optimizer cannot honour
//! ([`engine_unsupported`], refused by the trainer; a config can still be shown and converted).

use super::container::ConfigContainer;
use super::model::DType;
use super::optimizer::OptimizerKind;

/// The optimizer-state dtypes only the precision-aware optimizer may change.
fn state_dtypes(cfg: &ConfigContainer) -> [(&'static str, DType); 4] {
    let o = &cfg.optimizer;
    [
        ("main_grads_dtype", o.main_grads_dtype),
        ("main_params_dtype", o.main_params_dtype),
        ("exp_avg_dtype", o.exp_avg_dtype),
        ("exp_avg_sq_dtype", o.exp_avg_sq_dtype),
    ]
}

/// megatron-core's rules; call after the distributed-optimizer flags are synced.
pub fn apply(cfg: &ConfigContainer, errs: &mut Vec<String>) {
    let o = &cfg.optimizer;
    if o.use_precision_aware_optimizer {
        if o.optimizer != OptimizerKind::Adam {
            errs.push(
                "`optimizer.use_precision_aware_optimizer` is only supported with adam".into(),
            );
        }
        if !o.use_distributed_optimizer {
            errs.push(
                "`optimizer.use_precision_aware_optimizer` is only supported with the distributed \
                 optimizer (`ddp.use_distributed_optimizer=true`)"
                    .into(),
            );
        }
    } else {
        for (name, dtype) in state_dtypes(cfg) {
            if dtype != DType::F32 {
                errs.push(format!(
                    "`optimizer.{name}` can only be fp32 when not using the precision-aware \
                     optimizer (`optimizer.use_precision_aware_optimizer=true`)"
                ));
            }
        }
    }
}

/// Settings mbridge's optimizer cannot honour, one message per field.
pub fn engine_unsupported(cfg: &ConfigContainer) -> Vec<String> {
    let o = &cfg.optimizer;
    let mut errs = Vec::new();
    if o.use_precision_aware_optimizer {
        for (name, dtype) in state_dtypes(cfg) {
            let moment = name.starts_with("exp_avg");
            if dtype == DType::F32 || (moment && dtype == DType::BF16) {
                continue;
            }
            errs.push(if moment {
                format!(
                    "`optimizer.{name}` = {dtype:?}: moments are kept in fp32 or bf16; fp16 \
                     moments need Transformer Engine's per-tensor scaling, which is not \
                     implemented; set it to \"bf16\" or \"fp32\""
                )
            } else {
                format!(
                    "`optimizer.{name}` = {dtype:?}: the precision-aware optimizer keeps masters \
                     and main gradients in fp32 (bf16 masters as remainders, \
                     `optimizer.store_param_remainders`); other dtypes are not implemented, set \
                     it to \"fp32\""
                )
            });
        }
    }
    if o.optimizer_cpu_offload {
        errs.push(
            "`optimizer.optimizer_cpu_offload` = true: offloading the optimizer to the CPU is not \
             implemented; set it to false"
                .into(),
        );
    }
    if o.apply_wd_to_qk_layernorm && cfg.model.qk_layernorm {
        errs.push(
            "`optimizer.apply_wd_to_qk_layernorm` = true is not implemented (mbridge never \
             decays 1-D parameters); set it to false"
                .into(),
        );
    }
    for (name, on) in [
        ("optimizer.log_num_zeros_in_grad", o.log_num_zeros_in_grad),
        ("logger.log_num_zeros_in_grad", cfg.logger.log_num_zeros_in_grad),
    ] {
        if on {
            errs.push(format!(
                "`{name}` = true: counting zeros in the gradients is not implemented; set it to \
                 false"
            ));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConfigContainer {
        ConfigContainer::default()
    }

    #[test]
    fn state_dtypes_need_the_precision_aware_optimizer() {
        let mut c = cfg();
        c.optimizer.exp_avg_dtype = DType::BF16;
        let mut errs = Vec::new();
        apply(&c, &mut errs);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("`optimizer.exp_avg_dtype` can only be fp32"), "{errs:?}");
    }

    #[test]
    fn the_precision_aware_optimizer_needs_adam_and_the_distributed_optimizer() {
        let mut c = cfg();
        c.optimizer.use_precision_aware_optimizer = true;
        c.optimizer.optimizer = OptimizerKind::Sgd;
        let mut errs = Vec::new();
        apply(&c, &mut errs);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("only supported with adam"), "{errs:?}");
        assert!(errs[1].contains("distributed optimizer"), "{errs:?}");
        c.optimizer.optimizer = OptimizerKind::Adam;
        c.optimizer.use_distributed_optimizer = true;
        let mut errs = Vec::new();
        apply(&c, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(engine_unsupported(&c).is_empty());
    }

    #[test]
    fn the_engine_refuses_what_it_would_otherwise_ignore() {
        let mut c = cfg();
        assert!(engine_unsupported(&c).is_empty());
        c.optimizer.use_precision_aware_optimizer = true;
        // bf16 moments are kept (TE FusedAdam's exp_avg_dtype); fp16 ones need scaling.
        c.optimizer.exp_avg_dtype = DType::BF16;
        assert!(engine_unsupported(&c).is_empty(), "{:?}", engine_unsupported(&c));
        c.optimizer.main_params_dtype = DType::BF16;
        assert!(engine_unsupported(&c)[0].contains("`optimizer.main_params_dtype` = BF16"));
        c.optimizer.main_params_dtype = DType::F32;
        c.optimizer.exp_avg_sq_dtype = DType::F16;
        c.optimizer.optimizer_cpu_offload = true;
        c.optimizer.apply_wd_to_qk_layernorm = true;
        c.logger.log_num_zeros_in_grad = true;
        let errs = engine_unsupported(&c);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("`optimizer.exp_avg_sq_dtype` = F16"), "{errs:?}");
        assert!(errs[0].contains("per-tensor scaling"), "{errs:?}");
        assert!(errs[1].contains("optimizer_cpu_offload"), "{errs:?}");
        assert!(errs[2].contains("logger.log_num_zeros_in_grad"), "{errs:?}");
        // Weight decay on q/k layernorms matters only when the model has them.
        c.model.qk_layernorm = true;
        assert_eq!(engine_unsupported(&c).len(), 4);
    }
}
