//! Megatron Bridge's model FLOPs count (`training/utils/flop_utils.py`) for the throughput
//! (TFLOP/s/GPU) log field.

use crate::config::model::ModelConfig;

/// FLOPs of one forward+backward over `batch_size` sequences of `seq_len` tokens
/// (checkpoint-and-logging spec §7, dense GQA branch, with MoE and MTP terms):
///
/// `tokens · [6h(f·E·L_dense + f_moe·topk·E·L_moe + f_shared·E·L_moe)
///            + 6L(h(q + 2kv) + q·h + q·s) + 6·mtp·(3h + 2h²) + 6·h·Vp·(mtp + 1)]`
///
/// with `E = 3` for gated MLPs (else 2), `q = d·heads`, `kv = d·groups`; every layer is MoE
/// when `num_moe_experts` is set. Causal attention is counted as full `s²` (as the published
/// performance tables do); sliding windows are not discounted. For packed sequences pass
/// `Σs²/Σs` as `seq_len`. `cfg.vocab_size` is the padded vocabulary (0 if unset).
pub fn num_floating_point_operations(cfg: &ModelConfig, batch_size: usize, seq_len: f64) -> f64 {
    let h = cfg.hidden_size as f64;
    let l = cfg.num_layers as f64;
    let d = cfg.head_dim() as f64;
    let q = d * cfg.num_attention_heads as f64;
    let kv = d * cfg.query_groups() as f64;
    let e = if cfg.gated_linear_unit { 3.0 } else { 2.0 };
    let vp = cfg.vocab_size.unwrap_or(0) as f64;
    let mtp = cfg.mtp_num_layers.unwrap_or(0) as f64;
    let tokens = batch_size as f64 * seq_len;
    let mlp = match cfg.num_moe_experts {
        None => cfg.ffn_hidden() as f64 * e * l,
        Some(_) => {
            let moe_ffn = cfg.moe_ffn_hidden_size.unwrap_or_else(|| cfg.ffn_hidden()) as f64;
            let shared = cfg.moe_shared_expert_intermediate_size.unwrap_or(0) as f64;
            (moe_ffn * cfg.moe_router_topk as f64 + shared) * e * l
        }
    };
    let proj = h * (q + 2.0 * kv) + q * h;
    let core = q * seq_len;
    tokens
        * (6.0 * h * mlp
            + 6.0 * l * (proj + core)
            + 6.0 * mtp * (3.0 * h + 2.0 * h * h)
            + 6.0 * h * vp * (mtp + 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::Activation;

    fn llama3(layers: usize, hidden: usize, ffn: usize, heads: usize) -> ModelConfig {
        ModelConfig {
            num_layers: layers,
            hidden_size: hidden,
            ffn_hidden_size: Some(ffn),
            num_attention_heads: heads,
            num_query_groups: Some(8),
            vocab_size: Some(128256),
            gated_linear_unit: true,
            activation_func: Activation::Silu,
            ..Default::default()
        }
    }

    /// TFLOP/s/GPU at a published tokens/s/GPU rate, s = 8192.
    fn tflops(cfg: &ModelConfig, tok_per_s: f64) -> f64 {
        num_floating_point_operations(cfg, 1, 8192.0) / 8192.0 * tok_per_s / 1e12
    }

    #[test]
    fn llama3_8b_vector_from_spec() {
        let cfg = llama3(32, 4096, 14336, 32);
        let per_token = num_floating_point_operations(&cfg, 1, 8192.0) / 8192.0;
        assert!((per_token / 1e9 - 51.47).abs() < 0.005, "{per_token}");
        assert!((tflops(&cfg, 14451.0) - 743.8).abs() < 0.05);
    }

    #[test]
    fn llama3_70b_and_405b_vectors_from_notes() {
        let t70 = tflops(&llama3(80, 8192, 28672, 64), 1602.0);
        assert!((t70 - 719.7).abs() < 0.05, "{t70}");
        let t405 = tflops(&llama3(126, 16384, 53248, 128), 292.0);
        assert!((t405 - 737.0).abs() < 0.05, "{t405}");
    }

    #[test]
    fn batch_and_tokens_scale_linearly() {
        let cfg = llama3(2, 64, 128, 4);
        let one = num_floating_point_operations(&cfg, 1, 32.0);
        assert_eq!(num_floating_point_operations(&cfg, 3, 32.0), 3.0 * one);
    }
}
