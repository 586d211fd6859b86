//! `peft.*`: parameter-efficient finetuning (LoRA, DoRA, canonical LoRA).

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// Adapter family (`peft.peft_scheme`, also set by `mbridge finetune --peft`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeftScheme {
    Lora,
    Dora,
    CanonicalLora,
}

/// `peft.*` — the fields of Megatron Bridge's `LoRA` / `DoRA` / `CanonicalLoRA`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct PeftConfig {
    #[default(PeftScheme::Lora)]
    pub peft_scheme: PeftScheme,
    /// Module names or wildcard patterns such as `*.layers.0.*.linear_qkv`.
    #[default(vec!["linear_qkv".into(), "linear_proj".into(), "linear_fc1".into(), "linear_fc2".into()])]
    pub target_modules: Vec<String>,
    pub exclude_modules: Vec<String>,
    #[default = 32]
    pub dim: usize,
    /// LoRA default 32; DoRA recipes use 64.
    #[default = 32.0]
    pub alpha: f64,
    pub dropout: f64,
    /// "pre" | "post".
    #[default = "pre"]
    pub dropout_position: String,
    #[default = "xavier"]
    #[serde(rename = "lora_A_init_method")]
    pub lora_a_init_method: String,
    #[default = "zero"]
    #[serde(rename = "lora_B_init_method")]
    pub lora_b_init_method: String,
    pub lora_dtype: Option<super::model::DType>,
    pub sequence_parallel_input_regather: bool,
    pub a2a_experimental: bool,
}

impl PeftConfig {
    /// Defaults for a scheme as Megatron Bridge's classes set them.
    pub fn for_scheme(scheme: PeftScheme) -> Self {
        let mut cfg = PeftConfig { peft_scheme: scheme, ..Default::default() };
        match scheme {
            PeftScheme::Lora => {}
            PeftScheme::Dora => cfg.alpha = 64.0,
            PeftScheme::CanonicalLora => {
                cfg.target_modules = [
                    "linear_q",
                    "linear_k",
                    "linear_v",
                    "linear_proj",
                    "linear_fc1_up",
                    "linear_fc1_gate",
                    "linear_fc2",
                ]
                .map(String::from)
                .to_vec()
            }
        }
        cfg
    }
}
