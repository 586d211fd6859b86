//! config.json ⇄ ModelConfig: both transformers layouts parse to the same model config and are
//! written back in their own layout; family quirks and refusals.

use mbridge::bridge::hf_config::{parse_config, to_hf_config, Family, Layout};
use mbridge::config::model::{DType, PositionEmbedding};
use serde_json::{json, Value};

/// Llama-3.1-8B's config.json in both transformers layouts.
fn llama31(layout: Layout) -> Value {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
        "tie_word_embeddings": false, "hidden_act": "silu", "attention_bias": false,
        "mlp_bias": false, "bos_token_id": 128000, "eos_token_id": 128001,
    });
    let scaling = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"});
    let o = c.as_object_mut().unwrap();
    match layout {
        Layout::Transformers4 => {
            o.insert("rope_theta".into(), json!(500000.0));
            o.insert("rope_scaling".into(), scaling);
            o.insert("torch_dtype".into(), json!("bfloat16"));
        }
        Layout::Transformers5 => {
            let mut p = scaling;
            p["rope_theta"] = json!(500000.0);
            o.insert("rope_parameters".into(), p);
            o.insert("dtype".into(), json!("bfloat16"));
        }
    }
    c
}

#[test]
fn both_transformers_layouts_give_the_same_model_config() {
    let a = parse_config(&llama31(Layout::Transformers4), "t4").unwrap();
    let b = parse_config(&llama31(Layout::Transformers5), "t5").unwrap();
    assert_eq!((a.layout, b.layout), (Layout::Transformers4, Layout::Transformers5));
    assert_eq!(a.model, b.model);
    let m = &a.model;
    assert_eq!((m.num_layers, m.hidden_size, m.ffn_hidden_size), (32, 4096, Some(14336)));
    assert_eq!((m.num_query_groups, m.kv_channels, m.head_dim()), (Some(8), Some(128), 128));
    assert_eq!((m.rotary_base, m.rope_scaling, m.rope_scaling_factor), (500000.0, true, 8.0));
    assert_eq!((m.seq_length, m.vocab_size, m.layernorm_epsilon), (131072, Some(128256), 1e-5));
    assert!(!m.share_embeddings_and_output_weights && !m.add_qkv_bias && !m.qk_layernorm);
    assert_eq!((a.dtype, m.params_dtype, m.bf16), (Some(DType::BF16), DType::BF16, true));
    // Written back in each source's own layout with every math field intact.
    for (src, cfg) in [(llama31(Layout::Transformers4), &a), (llama31(Layout::Transformers5), &b)] {
        let out = to_hf_config(&cfg.model, cfg.family, 128256, DType::BF16, Some(&src)).unwrap();
        for (k, v) in src.as_object().unwrap() {
            assert_eq!(&out[k], v, "{k}");
        }
        assert_eq!(parse_config(&out, "out").unwrap().model, cfg.model);
    }
    // Without a source config: transformers-4 style.
    let out = to_hf_config(&a.model, Family::Llama, 128256, DType::BF16, None).unwrap();
    assert_eq!(out["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(out["torch_dtype"], "bfloat16");
    assert!(out.get("rope_parameters").is_none());
    assert_eq!(parse_config(&out, "out").unwrap().model, a.model);
}

#[test]
fn family_quirks_and_refusals() {
    let mut q = llama31(Layout::Transformers4);
    q["architectures"] = json!(["Qwen2ForCausalLM"]);
    q["rope_scaling"] = Value::Null;
    q["tie_word_embeddings"] = json!(true);
    let m = parse_config(&q, "q").unwrap().model;
    assert!(m.add_qkv_bias && m.share_embeddings_and_output_weights && !m.rope_scaling);
    let mut mi = llama31(Layout::Transformers4);
    mi["architectures"] = json!(["MistralForCausalLM"]);
    mi["sliding_window"] = json!(4096);
    assert_eq!(parse_config(&mi, "m").unwrap().model.window_size, Some([4095, 0]));
    for (key, val, msg) in [
        ("hidden_act", json!("gelu"), "hidden_act"),
        ("attention_bias", json!(true), "attention_bias"),
        ("num_local_experts", json!(8), "mixture-of-experts"),
        ("rope_scaling", json!({"rope_type": "dynamic", "factor": 4.0}), "dynamic"),
    ] {
        let mut c = llama31(Layout::Transformers4);
        c[key] = val;
        let err = parse_config(&c, "cfg.json").unwrap_err().to_string();
        assert!(err.contains(msg) && err.contains("cfg.json"), "{err}");
    }
    let mut c = llama31(Layout::Transformers4);
    c["rope_scaling"]["high_freq_factor"] = json!(2.0);
    assert!(parse_config(&c, "c").unwrap_err().to_string().contains("high_freq_factor"));
}

/// `rope_type = "yarn"` maps onto Megatron Bridge's `yarn_*` fields (the original context
/// defaulting to `max_position_embeddings`, as transformers does) and exports back unchanged,
/// in both transformers layouts.
#[test]
fn yarn_rope_scaling_round_trips() {
    for layout in [Layout::Transformers4, Layout::Transformers5] {
        let mut c = llama31(layout);
        let yarn = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
            "beta_fast": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": false});
        match layout {
            Layout::Transformers4 => c["rope_scaling"] = yarn,
            Layout::Transformers5 => {
                let mut p = yarn;
                p["rope_theta"] = json!(500000.0);
                c["rope_parameters"] = p;
            }
        }
        let parsed = parse_config(&c, "c").unwrap();
        let m = &parsed.model;
        assert_eq!(m.position_embedding_type, PositionEmbedding::Yarn);
        assert!(!m.rope_scaling);
        assert_eq!(m.yarn_rotary_scaling_factor, Some(4.0));
        assert_eq!(m.yarn_original_max_position_embeddings, Some(4096));
        assert_eq!((m.yarn_beta_fast, m.yarn_beta_slow), (Some(16.0), None));
        assert_eq!((m.yarn_mscale, m.yarn_mscale_all_dim), (Some(1.0), Some(0.5)));
        assert_eq!(m.yarn_correction_range_round_to_int, Some(false));
        let out = to_hf_config(m, parsed.family, parsed.vocab_size, DType::BF16, Some(&c)).unwrap();
        assert_eq!(parse_config(&out, "out").unwrap().model, *m, "{out}");
        // Without its own original context, transformers takes max_position_embeddings.
        let key = if layout == Layout::Transformers4 { "rope_scaling" } else { "rope_parameters" };
        c[key].as_object_mut().unwrap().remove("original_max_position_embeddings");
        let m = parse_config(&c, "c").unwrap().model;
        assert_eq!(m.yarn_original_max_position_embeddings, m.max_position_embeddings);
    }
}
