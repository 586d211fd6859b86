//! Logits of tiny HF models (transformers, fixtures from scripts/fixtures/model_hf_parity.py)
//! equal ours after mapping the HF weights onto Megatron names and fused layouts.

use candle_core::{DType, Device, Tensor};
use mbridge::bridge::hf_config::parse_config;
use mbridge::bridge::mapping::{export_to_hf_state, load_from_hf_state, megatron_to_hf};
use mbridge::config::model::{Activation, ModelConfig, Normalization, PositionEmbedding};
use mbridge::model::{ForwardOpts, GptModel, ParallelLayout};
use mbridge::ops::masked_cross_entropy;
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model").join(name)
}

/// The subset of config.json → ModelConfig the fixtures need (the full mapping is the
/// bridge's job, hf-mapping §6). YaRN's fields come from the bridge's own parsing, which is
/// what the YaRN fixture checks (it was written by transformers 4 or 5, whose layouts differ).
fn model_config(hf: &Value) -> ModelConfig {
    let u = |k: &str| hf[k].as_u64().unwrap_or_else(|| panic!("config.json: {k}")) as usize;
    let rope_type = hf["rope_parameters"]["rope_type"].as_str();
    if rope_type.or(hf["rope_scaling"]["rope_type"].as_str()) == Some("yarn") {
        let mut cfg = parse_config(hf, "config.json").unwrap().model;
        assert_eq!(cfg.position_embedding_type, PositionEmbedding::Yarn);
        (cfg.hidden_dropout, cfg.attention_dropout) = (0.0, 0.0);
        cfg.vocab_size = Some(cfg.padded_vocab_size(u("vocab_size")));
        return cfg;
    }
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
        add_qkv_bias: hf["attention_bias"].as_bool().unwrap_or(hf["model_type"] == "qwen2"),
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
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-4 * scale.max(1.0), "{name}: max |Δlogit| {diff} (max |logit| {scale})");
    eprintln!("{name}: max |Δlogit| {diff:.2e} (max |logit| {scale:.2})");

    // Export inverts the import bit for bit (split QKV, split fc1, vocabulary truncated).
    let exported = export_to_hf_state(&model, v).unwrap();
    let mut keys: Vec<_> = exported.keys().collect();
    keys.sort();
    let mut want_keys: Vec<_> = weights.keys().collect();
    want_keys.sort();
    assert_eq!(keys, want_keys, "{name}: exported names");
    for (k, t) in &exported {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = weights[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a == b, "{name}: exported {k} differs");
    }
}

/// Loss and gradients (f64) equal PyTorch's autograd through transformers' model, for weights
/// covering every fused layout, after mapping our Megatron-named gradients back to HF names.
fn check_grads_vs_torch(name: &str) {
    let dir = fixture(name);
    let hf: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = model_config(&hf);
    let dev = Device::Cpu;
    let model = GptModel::new(&cfg, ParallelLayout::single(), 0, DType::F64, &dev).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    load_from_hf_state(&model, &weights).unwrap();
    let r = candle_core::safetensors::load(dir.join("logits.safetensors"), &dev).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let labels = r["labels"].to_dtype(DType::U32).unwrap();
    let v = r["logits"].dim(2).unwrap();
    let logits = model.forward(&ids, &ForwardOpts::default()).unwrap();
    // HF's softmax runs over its own V classes; Megatron's also over the zero padding rows.
    let logits = logits.narrow(2, 0, v).unwrap();
    let (sum, count) = masked_cross_entropy(&logits, &labels, &r["loss_mask"]).unwrap();
    let loss = (sum / count).unwrap();
    let want = r["loss"].to_vec1::<f64>().unwrap()[0];
    let got = loss.to_scalar::<f64>().unwrap();
    // HF computes RoPE angles in f32 even for an f64 model, hence not 1e-12.
    assert!((got - want).abs() < 1e-7 * want.abs().max(1.0), "{name}: loss {got} vs {want}");
    let grads = loss.backward().unwrap();
    let named: Vec<(String, Tensor)> = model
        .params()
        .params()
        .iter()
        .map(|p| (p.name.clone(), grads.get(p.var.as_tensor()).unwrap().clone()))
        .collect();
    let ours = megatron_to_hf(&model, v, &named).unwrap();
    let mut compared = 0;
    for (k, g) in &r {
        let Some(hf_name) = k.strip_prefix("grad.") else {
            continue;
        };
        let a = ours[hf_name].to_dtype(DType::F32).unwrap();
        let scale = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = (a - g).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            d <= 1e-5 * scale.max(1e-3),
            "{name}: grad of {hf_name} off by {d} (scale {scale})"
        );
        compared += 1;
    }
    assert!(compared >= 6, "{name}: only {compared} gradients in the fixture");
}

#[test]
fn grads_match_torch() {
    for name in ["llama", "qwen2", "qwen3", "mistral", "qwen3_yarn"] {
        check_grads_vs_torch(name);
    }
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

/// YaRN (`rope_type = "yarn"`, Megatron's `position_embedding_type = "yarn"`): a ramp
/// between extrapolated and interpolated frequencies and the attention factor of two mscales.
#[test]
fn qwen3_yarn_rope_scaling() {
    check("qwen3_yarn");
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
