//! `config.json` ⇄ [`ModelConfig`] (hf-mapping §6–7), for both layouts found in the wild:
//! transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
//! (`rope_parameters`, `dtype`). Every field that changes the math is read, and anything the
//! model cannot reproduce exactly (biases on o_proj, per-layer sliding windows, other RoPE
//! types, other activations) is refused rather than silently dropped.

use crate::config::model::{Activation, DType, ModelConfig, Normalization, PositionEmbedding};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// A supported HF model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// `architectures[0]`, `model_type` and family of every supported model class.
pub const SUPPORTED: &[(&str, &str, Family)] = &[
    ("LlamaForCausalLM", "llama", Family::Llama),
    ("MistralForCausalLM", "mistral", Family::Mistral),
    ("Qwen2ForCausalLM", "qwen2", Family::Qwen2),
    ("Qwen3ForCausalLM", "qwen3", Family::Qwen3),
];

impl Family {
    /// HF class name written to `architectures`.
    pub fn architecture(self) -> &'static str {
        SUPPORTED.iter().find(|s| s.2 == self).map(|s| s.0).unwrap_or("LlamaForCausalLM")
    }
    /// HF `model_type`.
    pub fn model_type(self) -> &'static str {
        SUPPORTED.iter().find(|s| s.2 == self).map(|s| s.1).unwrap_or("llama")
    }
    /// The family a Megatron config most likely came from (for checkpoints trained from
    /// scratch, which carry no source config.json).
    pub fn guess(m: &ModelConfig) -> Family {
        if m.qk_layernorm {
            Family::Qwen3
        } else if m.add_qkv_bias {
            Family::Qwen2
        } else if m.window_size.is_some() {
            Family::Mistral
        } else {
            Family::Llama
        }
    }
}

/// Which transformers generation wrote a config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `rope_theta` / `rope_scaling` / `torch_dtype`.
    Transformers4,
    /// `rope_parameters` / `dtype`.
    Transformers5,
}

/// A parsed HF config.
#[derive(Debug, Clone)]
pub struct HfConfig {
    pub family: Family,
    pub layout: Layout,
    /// Model config with `vocab_size` = the HF (unpadded) vocabulary.
    pub model: ModelConfig,
    /// HF `vocab_size`.
    pub vocab_size: usize,
    /// `torch_dtype` / `dtype`, when given.
    pub dtype: Option<DType>,
    /// The file as read.
    pub raw: Value,
}

/// Reads and parses `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read `{}` (an HF model directory needs a config.json)", path.display())
    })?;
    let raw: Value = serde_json::from_str(&text).map_err(|e| {
        anyhow!("`{}` is not valid JSON ({e}); expected an HF model config object", path.display())
    })?;
    parse_config(&raw, &path.display().to_string())
}

/// Parses an HF config object; `origin` names it in errors.
pub fn parse_config(raw: &Value, origin: &str) -> Result<HfConfig> {
    let obj = raw
        .as_object()
        .ok_or_else(|| anyhow!("`{origin}`: expected a JSON object, found {}", kind(raw)))?;
    // `architectures` names the class; configs saved from a bare config object lack it, and
    // then `model_type` decides, as transformers' Auto classes do.
    let arch = obj.get("architectures").and_then(|a| a.as_array()).and_then(|a| a.first());
    let found = match (arch, obj.get("model_type").and_then(Value::as_str)) {
        (Some(a), _) => {
            let a = a.as_str().ok_or_else(|| anyhow!("`{origin}`: `architectures` must list class names"))?;
            SUPPORTED.iter().find(|s| s.0 == a).map(|s| s.2).ok_or_else(|| format!("architecture `{a}`"))
        }
        (None, Some(t)) => SUPPORTED.iter().find(|s| s.1 == t).map(|s| s.2).ok_or_else(|| format!("model_type `{t}`")),
        (None, None) => bail!("`{origin}`: neither `architectures` nor `model_type` is set; expected e.g. \"architectures\": [\"LlamaForCausalLM\"]"),
    };
    let family = match found {
        Ok(f) => f,
        Err(what) => {
            let names: Vec<&str> = SUPPORTED.iter().map(|s| s.0).collect();
            return Err(crate::config_err!(
                "`{origin}`: unsupported {what}; supported: {}",
                names.join(", ")
            )
            .into());
        }
    };
    let r = Reader { obj, origin };
    let heads = r.usize("num_attention_heads")?;
    let hidden = r.usize("hidden_size")?;
    let vocab = r.usize("vocab_size")?;
    let max_pos = r.usize("max_position_embeddings")?;
    let layout = if obj.contains_key("rope_parameters") {
        Layout::Transformers5
    } else {
        Layout::Transformers4
    };
    let mut m = ModelConfig {
        num_layers: r.usize("num_hidden_layers")?,
        hidden_size: hidden,
        ffn_hidden_size: Some(r.usize("intermediate_size")?),
        num_attention_heads: heads,
        num_query_groups: Some(r.opt_usize("num_key_value_heads")?.unwrap_or(heads)),
        // Resolved here (HF default h/heads) so both directions agree on an explicit value.
        kv_channels: Some(r.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1))),
        vocab_size: Some(vocab),
        seq_length: max_pos,
        max_position_embeddings: Some(max_pos),
        normalization: Normalization::RMSNorm,
        layernorm_epsilon: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        gated_linear_unit: true,
        activation_func: Activation::Silu,
        add_bias_linear: false,
        add_qkv_bias: family == Family::Qwen2,
        qk_layernorm: family == Family::Qwen3,
        share_embeddings_and_output_weights: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        position_embedding_type: PositionEmbedding::Rope,
        hidden_dropout: 0.0,
        attention_dropout: r.opt_f64("attention_dropout")?.unwrap_or(0.0),
        init_method_std: r.opt_f64("initializer_range")?.unwrap_or(0.02),
        ..Default::default()
    };
    let act = r.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        bail!("`{origin}`: hidden_act `{act}` is not supported (expected \"silu\", SwiGLU)");
    }
    for key in ["attention_bias", "mlp_bias"] {
        if family != Family::Qwen2 && r.opt_bool(key)? == Some(true) {
            bail!("`{origin}`: `{key}: true` adds biases Megatron's Llama layout has no place for; not supported");
        }
    }
    for key in ["num_experts", "num_local_experts", "n_routed_experts"] {
        if r.opt_usize(key)?.is_some_and(|n| n > 0) {
            bail!("`{origin}`: `{key}`: mixture-of-experts models are not supported by this bridge yet");
        }
    }
    match family {
        Family::Mistral => {
            if let Some(w) = r.opt_usize("sliding_window")? {
                // HF lets query i see keys j with i - j < W, i.e. W-1 previous tokens.
                m.window_size = Some([w as i64 - 1, 0]);
            }
        }
        Family::Qwen2 | Family::Qwen3 => {
            if r.opt_bool("use_sliding_window")? == Some(true) {
                bail!(
                    "`{origin}`: `use_sliding_window: true` (per-layer windows) is not supported"
                );
            }
        }
        Family::Llama => {}
    }
    read_rope(&r, layout, &mut m)?;
    let dtype_key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
    let dtype = match r.opt_str(dtype_key)? {
        None => None,
        Some(s) => Some(serde_json::from_value::<DType>(json!(s)).map_err(|_| {
            anyhow!("`{origin}`: `{dtype_key}` = {s:?}; expected float32, bfloat16 or float16")
        })?),
    };
    if let Some(d) = dtype {
        m.params_dtype = d;
        m.bf16 = d == DType::BF16;
        m.fp16 = d == DType::F16;
    }
    Ok(HfConfig { family, layout, model: m, vocab_size: vocab, dtype, raw: raw.clone() })
}

fn read_rope(r: &Reader, layout: Layout, m: &mut ModelConfig) -> Result<()> {
    let origin = r.origin;
    let (params, theta) = match layout {
        Layout::Transformers5 => {
            let p = r.obj.get("rope_parameters").and_then(Value::as_object).ok_or_else(|| {
                anyhow!("`{origin}`: `rope_parameters` must be an object with `rope_theta`")
            })?;
            let theta = p.get("rope_theta").and_then(Value::as_f64).ok_or_else(|| {
                anyhow!("`{origin}`: `rope_parameters.rope_theta` must be a number")
            })?;
            (Some(p), theta)
        }
        Layout::Transformers4 => {
            let p = match r.obj.get("rope_scaling") {
                None | Some(Value::Null) => None,
                Some(Value::Object(p)) => Some(p),
                Some(v) => {
                    bail!("`{origin}`: `rope_scaling` must be an object or null, found {}", kind(v))
                }
            };
            (p, r.opt_f64("rope_theta")?.unwrap_or(10000.0))
        }
    };
    m.rotary_base = theta;
    let prf = params.and_then(|p| p.get("partial_rotary_factor")).and_then(Value::as_f64);
    m.rotary_percent = prf.or(r.opt_f64("partial_rotary_factor")?).unwrap_or(1.0);
    let Some(p) = params else { return Ok(()) };
    let ty =
        p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| p.get(k).and_then(Value::as_f64);
    match ty {
        "default" => {}
        "llama3" => {
            // Megatron hard-codes these three (hf-mapping §7); others would change the math.
            for (k, want) in [
                ("low_freq_factor", 1.0),
                ("high_freq_factor", 4.0),
                ("original_max_position_embeddings", 8192.0),
            ] {
                if num(k) != Some(want) {
                    bail!("`{origin}`: llama3 rope scaling needs {k} = {want} (Megatron's fixed value), found {:?}", num(k));
                }
            }
            m.rope_scaling = true;
            m.rope_scaling_factor = num("factor")
                .ok_or_else(|| anyhow!("`{origin}`: llama3 rope scaling needs `factor`"))?;
        }
        "linear" => {
            m.seq_len_interpolation_factor = Some(
                num("factor")
                    .ok_or_else(|| anyhow!("`{origin}`: linear rope scaling needs `factor`"))?,
            );
        }
        "yarn" => {
            // Megatron Bridge's `YARN_ROPE_SCALING_MAPPING`; Hugging Face's original context
            // defaults to `max_position_embeddings`.
            m.position_embedding_type = PositionEmbedding::Yarn;
            m.yarn_rotary_scaling_factor = Some(
                num("factor")
                    .ok_or_else(|| anyhow!("`{origin}`: yarn rope scaling needs `factor`"))?,
            );
            m.yarn_original_max_position_embeddings = match num("original_max_position_embeddings")
            {
                Some(n) => Some(n as usize),
                None => m.max_position_embeddings,
            };
            m.yarn_beta_fast = num("beta_fast");
            m.yarn_beta_slow = num("beta_slow");
            m.yarn_mscale = num("mscale");
            m.yarn_mscale_all_dim = num("mscale_all_dim");
            m.yarn_correction_range_round_to_int = p.get("truncate").and_then(Value::as_bool);
            if let Some(given) = num("attention_factor") {
                bail!("`{origin}`: yarn `attention_factor` = {given} is not supported (Megatron derives it from `mscale` and `mscale_all_dim`)");
            }
        }
        other => {
            bail!("`{origin}`: rope type `{other}` is not supported (default, llama3, linear, yarn are)")
        }
    }
    Ok(())
}

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl Reader<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| {
            anyhow!("`{}`: `{key}` is missing (expected a positive integer)", self.origin)
        })
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.present(key)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    anyhow!("`{}`: `{key}` must be a non-negative integer, found {v}", self.origin)
                })
            })
            .transpose()
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key)
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    anyhow!("`{}`: `{key}` must be a number, found {v}", self.origin)
                })
            })
            .transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.present(key)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    anyhow!("`{}`: `{key}` must be true or false, found {v}", self.origin)
                })
            })
            .transpose()
    }
    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.present(key)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    anyhow!("`{}`: `{key}` must be a string, found {v}", self.origin)
                })
            })
            .transpose()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// HF name of a dtype as config.json spells it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
    }
}

/// The `largest power of two ≤ 128 dividing V` rule HF-derived bridges use for
/// `make_vocab_size_divisible_by`, so the HF vocabulary is normally kept (hf-mapping §4).
pub fn vocab_divisor(vocab: usize) -> usize {
    let mut d = 128;
    while d > 1 && !vocab.is_multiple_of(d) {
        d /= 2;
    }
    d
}

/// Writes `m` as an HF config.json. `base` (the source model's config.json, when the
/// checkpoint kept it) fixes the layout and keeps non-math fields (token ids, versions);
/// without it a transformers-4 style config is produced.
pub fn to_hf_config(
    m: &ModelConfig,
    family: Family,
    hf_vocab: usize,
    dtype: DType,
    base: Option<&Value>,
) -> Result<Value> {
    let mut obj = base.and_then(Value::as_object).cloned().unwrap_or_default();
    let layout = if obj.contains_key("rope_parameters") {
        Layout::Transformers5
    } else {
        Layout::Transformers4
    };
    let set = |o: &mut Map<String, Value>, k: &str, v: Value| {
        o.insert(k.to_string(), v);
    };
    set(&mut obj, "architectures", json!([family.architecture()]));
    set(&mut obj, "model_type", json!(family.model_type()));
    set(&mut obj, "hidden_size", json!(m.hidden_size));
    set(&mut obj, "intermediate_size", json!(m.ffn_hidden()));
    set(&mut obj, "num_hidden_layers", json!(m.num_layers));
    set(&mut obj, "num_attention_heads", json!(m.num_attention_heads));
    set(&mut obj, "num_key_value_heads", json!(m.query_groups()));
    set(&mut obj, "head_dim", json!(m.head_dim()));
    set(&mut obj, "vocab_size", json!(hf_vocab));
    set(&mut obj, "max_position_embeddings", json!(m.max_positions()));
    set(&mut obj, "rms_norm_eps", json!(m.layernorm_epsilon));
    set(&mut obj, "initializer_range", json!(m.init_method_std));
    set(&mut obj, "tie_word_embeddings", json!(m.share_embeddings_and_output_weights));
    set(&mut obj, "hidden_act", json!("silu"));
    set(&mut obj, "attention_dropout", json!(m.attention_dropout));
    match family {
        Family::Llama => {
            set(&mut obj, "attention_bias", json!(false));
            set(&mut obj, "mlp_bias", json!(false));
        }
        Family::Qwen3 => set(&mut obj, "attention_bias", json!(false)),
        Family::Mistral => {
            let w = m.window_size.map(|[left, _]| json!(left + 1)).unwrap_or(Value::Null);
            set(&mut obj, "sliding_window", w);
        }
        Family::Qwen2 => {}
    }
    let mut rope = Map::new();
    if m.rope_scaling {
        rope.insert("rope_type".into(), json!("llama3"));
        rope.insert("factor".into(), json!(m.rope_scaling_factor));
        rope.insert("low_freq_factor".into(), json!(1.0));
        rope.insert("high_freq_factor".into(), json!(4.0));
        rope.insert("original_max_position_embeddings".into(), json!(8192));
    } else if let Some(f) = m.seq_len_interpolation_factor {
        rope.insert("rope_type".into(), json!("linear"));
        rope.insert("factor".into(), json!(f));
    }
    if m.position_embedding_type == PositionEmbedding::Yarn {
        rope.insert("rope_type".into(), json!("yarn"));
        let optional = [
            ("factor", m.yarn_rotary_scaling_factor),
            ("beta_fast", m.yarn_beta_fast),
            ("beta_slow", m.yarn_beta_slow),
            ("mscale", m.yarn_mscale),
            ("mscale_all_dim", m.yarn_mscale_all_dim),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                rope.insert(key.into(), json!(v));
            }
        }
        if let Some(n) = m.yarn_original_max_position_embeddings {
            rope.insert("original_max_position_embeddings".into(), json!(n));
        }
        if let Some(t) = m.yarn_correction_range_round_to_int {
            rope.insert("truncate".into(), json!(t));
        }
    }
    match layout {
        Layout::Transformers4 => {
            set(&mut obj, "rope_theta", json!(m.rotary_base));
            set(
                &mut obj,
                "rope_scaling",
                if rope.is_empty() { Value::Null } else { Value::Object(rope) },
            );
            set(&mut obj, "torch_dtype", json!(dtype_name(dtype)));
        }
        Layout::Transformers5 => {
            if rope.is_empty() {
                rope.insert("rope_type".into(), json!("default"));
            }
            rope.insert("rope_theta".into(), json!(m.rotary_base));
            set(&mut obj, "rope_parameters", Value::Object(rope));
            set(&mut obj, "dtype", json!(dtype_name(dtype)));
        }
    }
    if m.rotary_percent != 1.0 {
        set(&mut obj, "partial_rotary_factor", json!(m.rotary_percent));
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_divisor_keeps_hf_vocab() {
        assert_eq!(vocab_divisor(128256), 128);
        assert_eq!(vocab_divisor(100), 4);
        assert_eq!(vocab_divisor(50257), 1);
        assert_eq!(vocab_divisor(151936), 128);
    }
}
