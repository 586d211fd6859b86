//! Logits of tiny HF models (transformers, fixtures from scripts/fixtures/model_hf_parity.py)
//! equal ours after mapping the HF weights onto Megatron names and fused layouts.

use candle_core::{DType, Device, Tensor};
use mbridge::config::model::{Activation, ModelConfig, Normalization, PositionEmbedding};
use mbridge::model::{load_from_hf_state, ForwardOpts, GptModel, ParallelLayout};
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

/// The subset of config.json → ModelConfig the fixtures need (the full mapping is the
/// bridge's job, hf-mapping §6).
fn model_config(hf: &Value) -> ModelConfig {
    let u = |k: &str| hf[k].as_u64().unwrap_or_else(|| panic!("config.json: {k}")) as usize;
    let rope = &hf["rope_parameters"];
    let mut cfg = ModelConfig {
        num_layers: u("num_hidden_layers"),
        hidden_size: u("hidden_size"),
        ffn_hidden_size: Some(u("intermediate_size")),
        num_attention_heads: u("num_attention_heads"),
        num_query_groups: Some(u("num_key_value_heads")),
        kv_channels: hf["head_dim"].as_u64().map(|d| d as usize),
        seq_length: u("max_position_embeddings"),
        normalization: Normalization::RMSNorm,
        layernorm_epsilon: hf["rms_norm_eps"].as_f64().unwrap(),
        gated_linear_unit: true,
        activation_func: Activation::Silu,
        add_bias_linear: false,
        add_qkv_bias: hf["attention_bias"]
            .as_bool()
            .unwrap_or(hf["model_type"] == "qwen2"),
        qk_layernorm: hf["model_type"] == "qwen3",
        share_embeddings_and_output_weights: hf["tie_word_embeddings"].as_bool().unwrap(),
        position_embedding_type: PositionEmbedding::Rope,
        rotary_base: rope["rope_theta"].as_f64().unwrap(),
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        ..Default::default()
    };
    if rope["rope_type"] == "llama3" {
        cfg.rope_scaling = true;
        cfg.rope_scaling_factor = rope["factor"].as_f64().unwrap();
    }
    if let Some(w) = hf["sliding_window"].as_i64() {
        if hf["use_sliding_window"].as_bool().unwrap_or(true) {
            // HF lets query i see keys j with i - j < W, i.e. W-1 previous tokens.
            cfg.window_size = Some([w - 1, 0]);
        }
    }
    cfg.vocab_size = Some(cfg.padded_vocab_size(u("vocab_size")));
    cfg
}

fn check(name: &str) {
    let dir = fixture(name);
    let hf: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = model_config(&hf);
    let dev = Device::Cpu;
    let model = GptModel::new(&cfg, ParallelLayout::single(), 0, DType::F32, &dev).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    let unused = load_from_hf_state(&model, &weights).unwrap();
    assert!(unused.is_empty(), "{name}: unused HF tensors {unused:?}");
    let reference = candle_core::safetensors::load(dir.join("logits.safetensors"), &dev).unwrap();
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let want = &reference["logits"];
    let v = want.dim(2).unwrap();
    let got = model.forward(&ids, &ForwardOpts::default()).unwrap();
    assert_eq!(got.dim(2).unwrap(), cfg.vocab_size.unwrap());
    let got = got.narrow(2, 0, v).unwrap();
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{name}: max |Δlogit| {diff} (max |logit| {scale})"
    );
    eprintln!("{name}: max |Δlogit| {diff:.2e} (max |logit| {scale:.2})");
}

#[test]
fn llama31_rope_scaling_untied_padded_vocab() {
    check("llama");
}

#[test]
fn qwen2_qkv_bias_tied() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm_head_dim() {
    check("qwen3");
}

#[test]
fn mistral_sliding_window() {
    check("mistral");
}

/// The sliding window must matter for this fixture, or the Mistral test proves nothing.
#[test]
fn mistral_window_changes_logits() {
    let dir = fixture("mistral");
    let hf: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut cfg = model_config(&hf);
    cfg.window_size = None;
    let dev = Device::Cpu;
    let model = GptModel::new(&cfg, ParallelLayout::single(), 0, DType::F32, &dev).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    load_from_hf_state(&model, &weights).unwrap();
    let reference = candle_core::safetensors::load(dir.join("logits.safetensors"), &dev).unwrap();
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let got = model.forward(&ids, &ForwardOpts::default()).unwrap();
    let diff: Tensor = (got - &reference["logits"]).unwrap().abs().unwrap();
    assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-2);
}
