//! `mixed_precision`: a preset name (`"bf16_mixed"`) or a table of
//! Megatron Bridge's `MixedPrecisionConfig` fields.
//!
//! Resolving copies every field onto the same-named fields of `model`, `optimizer` and `ddp`
//! (Megatron Bridge's `setup()`), which happens once, in finalize.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::model::DType;

/// `mixed_precision = "bf16_mixed"` or `[mixed_precision] bf16 = true ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MixedPrecision {
    Preset(String),
    Table(MixedPrecisionConfig),
}

/// Fields of a mixed-precision recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct MixedPrecisionConfig {
    pub fp32: bool,
    pub fp16: bool,
    pub bf16: bool,
    pub params_dtype: Option<DType>,
    pub pipeline_dtype: Option<DType>,
    pub autocast_dtype: Option<DType>,
    pub autocast_enabled: bool,
    /// Copied to `ddp.grad_reduce_in_fp32` (as Megatron does). false with bf16 parameters:
    /// bf16 gradients end to end (`ops::main_grads`), as Megatron Bridge's performance
    /// recipes run.
    #[default = true]
    pub grad_reduce_in_fp32: bool,
    pub fp8: Option<String>,
    #[default(Some("tensorwise".to_string()))]
    pub fp8_recipe: Option<String>,
    pub first_last_layers_bf16: bool,
    pub fp8_margin: i64,
    #[default = 1]
    pub fp8_amax_history_len: usize,
    #[default = "most_recent"]
    pub fp8_amax_compute_algo: String,
    #[default = true]
    pub fp8_wgrad: bool,
    pub fp8_param: Option<bool>,
    pub fp8_param_gather: bool,
    pub fp4: Option<String>,
    pub loss_scale: Option<f64>,
    #[default = 4294967296.0]
    pub initial_loss_scale: f64,
    #[default = 1.0]
    pub min_loss_scale: f64,
    #[default = 1000]
    pub loss_scale_window: usize,
    #[default = 2]
    pub hysteresis: usize,
    pub num_layers_at_start_in_bf16: usize,
    pub num_layers_at_end_in_bf16: usize,
    pub fp8_dot_product_attention: bool,
    pub fp8_multi_head_attention: bool,
    #[default = "nvfp4"]
    pub fp4_recipe: String,
    pub fp4_param: Option<bool>,
    pub fp4_param_gather: bool,
    pub reuse_grad_buf_for_mxfp8_param_ag: bool,
}

/// Names of the presets Megatron Bridge registers (hyphenated aliases are accepted too).
pub const PRESETS: &[&str] = &[
    "bf16_mixed",
    "fp16_mixed",
    "bf16_with_fp8_delayed_scaling_mixed",
    "fp16_with_fp8_delayed_scaling_mixed",
    "bf16_with_mxfp8_mixed",
    "fp16_with_mxfp8_mixed",
    "bf16_with_fp8_current_scaling_mixed",
    "fp16_with_fp8_current_scaling_mixed",
    "nemotron_h_bf16_with_fp8_current_scaling_mixed",
    "bf16_with_fp8_subchannel_scaling_mixed",
    "fp16_with_fp8_subchannel_scaling_mixed",
    "bf16_with_nvfp4_mixed",
];

/// The table a preset name stands for; None for an unknown name.
pub fn preset(name: &str) -> Option<MixedPrecisionConfig> {
    let name = name.replace('-', "_");
    if !PRESETS.contains(&name.as_str()) {
        return None;
    }
    let half = if name.starts_with("fp16") { DType::F16 } else { DType::BF16 };
    let mut mp = MixedPrecisionConfig {
        bf16: half == DType::BF16,
        fp16: half == DType::F16,
        params_dtype: Some(half),
        pipeline_dtype: Some(half),
        autocast_enabled: false,
        grad_reduce_in_fp32: half == DType::BF16,
        ..Default::default()
    };
    if name.contains("fp8_delayed") {
        mp.fp8 = Some("hybrid".into());
        mp.fp8_recipe = Some("delayed".into());
        mp.fp8_amax_history_len = 1024;
        mp.fp8_amax_compute_algo = "max".into();
        mp.fp8_param_gather = true;
    } else if name.contains("mxfp8") {
        mp.fp8 = Some("e4m3".into());
        mp.fp8_recipe = Some("mxfp8".into());
        mp.fp8_param_gather = true;
    } else if name.contains("fp8_current") {
        mp.fp8 = Some("hybrid".into());
        mp.fp8_recipe = Some("tensorwise".into());
        mp.first_last_layers_bf16 = true;
        let n = if name.starts_with("nemotron_h") { 2 } else { 1 };
        mp.num_layers_at_start_in_bf16 = n;
        mp.num_layers_at_end_in_bf16 = n;
        mp.fp8_param_gather = true;
    } else if name.contains("subchannel") {
        mp.fp8 = Some("hybrid".into());
        mp.fp8_recipe = Some("blockwise".into());
    } else if name.contains("nvfp4") {
        mp.fp4 = Some("e2m1".into());
    }
    // `fp8_param` stays unset: Megatron Bridge keeps it in sync with `fp8_param_gather`
    // (setting either sets both), so an override of either one after the preset decides.
    Some(mp)
}
