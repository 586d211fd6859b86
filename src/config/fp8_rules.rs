//! What mbridge's FP8 engine (`ops::fp8`: Transformer Engine's tensorwise current scaling in
//! the transformer blocks' linear layers) runs, and what it refuses instead of ignoring.

use super::container::ConfigContainer;
use super::model::DType;

/// The FP8 formats mbridge runs (`mixed_precision.fp8`).
const FORMATS: [&str; 2] = ["hybrid", "e4m3"];

/// Settings of `model.fp8*` (copied from `mixed_precision`) the engine cannot honour, one
/// message per problem.
pub fn engine_unsupported(cfg: &ConfigContainer) -> Vec<String> {
    let m = &cfg.model;
    let mut errs = Vec::new();
    if let Some(fp4) = &m.fp4 {
        errs.push(format!(
            "`mixed_precision.fp4` = {fp4:?}: FP4 training (NVFP4, Blackwell GPUs) is not \
             implemented"
        ));
    }
    let Some(fp8) = &m.fp8 else { return errs };
    if !FORMATS.contains(&fp8.as_str()) {
        errs.push(format!("`mixed_precision.fp8` = {fp8:?}: mbridge runs {FORMATS:?}"));
    }
    let recipe = m.fp8_recipe.as_deref().unwrap_or("tensorwise");
    if recipe != "tensorwise" {
        errs.push(format!(
            "`mixed_precision.fp8_recipe` = {recipe:?}: mbridge runs FP8 with tensorwise current \
             scaling only (\"tensorwise\", the `bf16_with_fp8_current_scaling_mixed` preset); \
             delayed, block-wise and MX scaling are not implemented"
        ));
    }
    if m.fp8_param == Some(true) && m.params_dtype != DType::BF16 {
        errs.push(
            "FP8 primary weights (`mixed_precision.fp8_param` / `fp8_param_gather`) take bf16 \
             gradients: use them with bf16 parameters"
                .into(),
        );
    }
    if !matches!(m.params_dtype, DType::BF16 | DType::F16) {
        errs.push(
            "FP8 GEMMs write bf16 or fp16 outputs: use them with a bf16 or fp16 mixed-precision \
             recipe (`mixed_precision=bf16_with_fp8_current_scaling_mixed`)"
                .into(),
        );
    }
    if cfg.peft.is_some() {
        errs.push("FP8 with PEFT adapters is not implemented".into());
    }
    if m.hidden_dropout > 0.0 || m.attention_dropout > 0.0 {
        errs.push(
            "FP8 runs in the written-out layer backward, which has no dropout: set \
             `model.hidden_dropout=0` and `model.attention_dropout=0`"
                .into(),
        );
    }
    errs.extend(gemm_dims(cfg));
    errs
}

/// Hopper's FP8 GEMMs need every dimension divisible by 16: each rank's share of the linear
/// layers' widths and the tokens of a micro-batch.
fn gemm_dims(cfg: &ConfigContainer) -> Vec<String> {
    let m = &cfg.model;
    let tp = m.tensor_model_parallel_size.max(1);
    let (heads, groups, head_dim) = (m.num_attention_heads, m.query_groups(), m.head_dim());
    let tokens =
        cfg.train.micro_batch_size.unwrap_or(1) * m.seq_length / m.context_parallel_size.max(1);
    let dims = [
        ("model.hidden_size", m.hidden_size),
        ("model.ffn_hidden_size / TP", m.ffn_hidden() / tp),
        ("query and key/value widths / TP", (heads + 2 * groups) * head_dim / tp),
        ("attention output width / TP", heads * head_dim / tp),
        ("tokens per micro-batch (micro_batch_size × seq_length / CP)", tokens),
    ];
    dims.iter()
        .filter(|(_, d)| !d.is_multiple_of(16))
        .map(|(name, d)| format!("FP8 GEMMs need dimensions divisible by 16: {name} is {d}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp8_cfg() -> ConfigContainer {
        let mut c = ConfigContainer::default();
        c.model.fp8 = Some("hybrid".into());
        c.model.fp8_recipe = Some("tensorwise".into());
        c.model.params_dtype = DType::BF16;
        c.model.hidden_size = 64;
        c.model.num_attention_heads = 4;
        c.model.ffn_hidden_size = Some(128);
        c.model.seq_length = 32;
        c.model.hidden_dropout = 0.0;
        c.model.attention_dropout = 0.0;
        c
    }

    #[test]
    fn a_supported_fp8_config_passes() {
        let c = fp8_cfg();
        assert!(engine_unsupported(&c).is_empty(), "{:?}", engine_unsupported(&c));
        assert!(engine_unsupported(&ConfigContainer::default()).is_empty());
    }

    #[test]
    fn what_fp8_cannot_run_is_named() {
        let mut c = fp8_cfg();
        c.model.fp8_recipe = Some("delayed".into());
        c.model.fp8_param = Some(true);
        c.model.params_dtype = DType::F32;
        c.model.seq_length = 20;
        let errs = engine_unsupported(&c);
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].contains("\"delayed\""), "{errs:?}");
        assert!(errs[1].contains("fp8_param") && errs[1].contains("bf16"), "{errs:?}");
        assert!(errs[2].contains("bf16 or fp16"), "{errs:?}");
        assert!(
            errs[3].contains("tokens per micro-batch") && errs[3].contains("is 20"),
            "{errs:?}"
        );
        let mut c = fp8_cfg();
        c.model.fp8 = Some("e5m2".into());
        c.model.fp4 = Some("e2m1".into());
        let errs = engine_unsupported(&c);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("FP4") && errs[1].contains("\"e5m2\""), "{errs:?}");
    }
}
