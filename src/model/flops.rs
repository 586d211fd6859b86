//! Megatron's model FLOPs count for the throughput (TFLOP/s/GPU) log field.

use crate::config::model::ModelConfig;

/// FLOPs of one forward+backward over `batch_size` sequences of `seq_len` tokens for a dense
/// GQA model (checkpoint-and-logging spec §7):
/// `tokens · [6h·f·E·L + 6L(h(q + 2kv) + q·h + q·s) + 6·h·Vp]`, with `E = 3` for gated MLPs
/// (else 2), `q = d·heads`, `kv = d·groups`. For packed sequences pass `Σs²/Σs` as `seq_len`.
/// `cfg.vocab_size` is the padded vocabulary (0 if unset).
pub fn num_floating_point_operations(cfg: &ModelConfig, batch_size: usize, seq_len: f64) -> f64 {
    let h = cfg.hidden_size as f64;
    let l = cfg.num_layers as f64;
    let f = cfg.ffn_hidden() as f64;
    let d = cfg.head_dim() as f64;
    let q = d * cfg.num_attention_heads as f64;
    let kv = d * cfg.query_groups() as f64;
    let e = if cfg.gated_linear_unit { 3.0 } else { 2.0 };
    let vp = cfg.vocab_size.unwrap_or(0) as f64;
    let tokens = batch_size as f64 * seq_len;
    let mlp = 6.0 * h * f * e * l;
    let attn = 6.0 * l * (h * (q + 2.0 * kv) + q * h + q * seq_len);
    let logits = 6.0 * h * vp;
    tokens * (mlp + attn + logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::Activation;

    #[test]
    fn llama3_8b_vector_from_spec() {
        let cfg = ModelConfig {
            num_layers: 32,
            hidden_size: 4096,
            ffn_hidden_size: Some(14336),
            num_attention_heads: 32,
            num_query_groups: Some(8),
            vocab_size: Some(128256),
            gated_linear_unit: true,
            activation_func: Activation::Silu,
            ..Default::default()
        };
        let per_token = num_floating_point_operations(&cfg, 1, 8192.0) / 8192.0;
        assert!((per_token / 1e9 - 51.47).abs() < 0.005, "{per_token}");
        let tflops = per_token * 14451.0 / 1e12;
        assert!((tflops - 743.8).abs() < 0.05, "{tflops}");
    }
}
