//! Shared helpers of the model tests: finite-difference gradient checks and tiny configs.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use mbridge::config::model::{Activation, ModelConfig, Normalization, PositionEmbedding};

/// Deterministic pseudo-random f64 values in [-1, 1) (xorshift; no RNG crates needed here).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// A random f64 tensor of `shape` scaled by `scale`.
pub fn rand_t(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = rand_vec(n, seed).into_iter().map(|x| x * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A random f64 variable.
pub fn rand_var(shape: &[usize], seed: u64, scale: f64) -> Var {
    Var::from_tensor(&rand_t(shape, seed, scale)).unwrap()
}

/// Reduces any output to a scalar with fixed random weights, so every output element
/// contributes a distinct gradient.
pub fn project(out: &Tensor, seed: u64) -> Result<Tensor> {
    let w = rand_t(out.dims(), seed, 1.0).to_dtype(out.dtype())?;
    out.mul(&w)?.sum_all()
}

/// Compares the autograd gradient of `loss` w.r.t. each var with central finite differences
/// on up to `samples` elements per var. Panics with the var name and element on mismatch;
/// also panics when a var has no gradient at all.
pub fn check_grads(vars: &[(String, Var)], loss: &dyn Fn() -> Result<Tensor>, samples: usize) {
    let l = loss().unwrap();
    assert_eq!(l.dtype(), DType::F64, "gradient checks run in f64");
    let grads = l.backward().unwrap();
    let eps = 1e-5;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.shape().clone();
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let n = orig.len();
        let k = samples.min(n);
        for s in 0..k {
            // Spread the probes over the tensor, with an odd offset to hit different rows.
            let idx = (s * n / k + s * 7) % n;
            let eval = |delta: f64| {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, &shape, &Device::Cpu).unwrap()).unwrap();
                loss().unwrap().to_scalar::<f64>().unwrap()
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), &shape, &Device::Cpu).unwrap()).unwrap();
            let ana = g[idx];
            let tol = 1e-6 * (1.0 + num.abs().max(ana.abs()));
            assert!(
                (num - ana).abs() <= tol,
                "{name}[{idx}]: analytic {ana:.10e} vs numeric {num:.10e}"
            );
        }
    }
}

/// Tiny Llama-3.1-like config: RMSNorm, GQA 4/2, SwiGLU, untied, RoPE with llama3 scaling on
/// half the head dims.
pub fn tiny_llama() -> ModelConfig {
    ModelConfig {
        num_layers: 2,
        hidden_size: 16,
        ffn_hidden_size: Some(24),
        num_attention_heads: 4,
        num_query_groups: Some(2),
        vocab_size: Some(32),
        seq_length: 16,
        normalization: Normalization::RMSNorm,
        gated_linear_unit: true,
        activation_func: Activation::Silu,
        add_bias_linear: false,
        share_embeddings_and_output_weights: false,
        position_embedding_type: PositionEmbedding::Rope,
        rotary_base: 500000.0,
        rotary_percent: 0.5,
        rope_scaling: true,
        rope_scaling_factor: 8.0,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        init_method_std: 0.3,
        ..Default::default()
    }
}

/// Tiny Qwen3/Mistral-like config: QK-norm, QKV bias, head_dim 6 (≠ 16/4), tied embeddings,
/// sliding window of 3 previous tokens.
pub fn tiny_qwen_window() -> ModelConfig {
    ModelConfig {
        kv_channels: Some(6),
        qk_layernorm: true,
        add_qkv_bias: true,
        share_embeddings_and_output_weights: true,
        rope_scaling: false,
        rotary_percent: 1.0,
        window_size: Some([3, 0]),
        ..tiny_llama()
    }
}

/// Tiny GPT-2-like config: LayerNorm with zero-centered gamma, learned absolute positions,
/// plain GELU MLP, biases everywhere, MQA (one query group), tied embeddings.
pub fn tiny_gpt() -> ModelConfig {
    ModelConfig {
        num_query_groups: Some(1),
        normalization: Normalization::LayerNorm,
        layernorm_zero_centered_gamma: true,
        gated_linear_unit: false,
        activation_func: Activation::Gelu,
        add_bias_linear: true,
        share_embeddings_and_output_weights: true,
        position_embedding_type: PositionEmbedding::LearnedAbsolute,
        rope_scaling: false,
        ..tiny_llama()
    }
}
