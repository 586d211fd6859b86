//! The parameter registry the importer derives from the table equals the model's own.

use candle_core::{DType, Device};
use mbridge::bridge::mapping::{megatron_params, MegatronParam};
use mbridge::config::model::{Activation, ModelConfig, Normalization, PositionEmbedding};
use mbridge::model::{stage_layers, GptArch, GptModel, ParallelLayout};
use mbridge::train::checkpointing::partition_of;

/// The registry import writes without building a model equals the model's own, for every
/// family quirk, tie and pipeline stage.
#[test]
fn megatron_params_match_the_model_registry() {
    for (qkv_bias, qk_norm, tied) in
        [(false, false, false), (true, false, true), (false, true, false)]
    {
        let cfg = ModelConfig {
            num_layers: 4,
            hidden_size: 16,
            ffn_hidden_size: Some(24),
            num_attention_heads: 4,
            num_query_groups: Some(2),
            kv_channels: Some(8),
            vocab_size: Some(64),
            normalization: Normalization::RMSNorm,
            gated_linear_unit: true,
            activation_func: Activation::Silu,
            add_bias_linear: false,
            add_qkv_bias: qkv_bias,
            qk_layernorm: qk_norm,
            share_embeddings_and_output_weights: tied,
            position_embedding_type: PositionEmbedding::Rope,
            ..Default::default()
        };
        let arch = GptArch::from_config(&cfg).unwrap();
        for pp_size in [1, 2] {
            for pp in 0..pp_size {
                let layout = ParallelLayout { tp_rank: 0, tp_size: 2, pp_rank: pp, pp_size };
                let model = GptModel::new(&cfg, layout, 0, DType::F32, &Device::Cpu).unwrap();
                let layers = stage_layers(&cfg, pp, pp_size).unwrap();
                let ours = megatron_params(&arch, &layers, pp, pp_size).unwrap();
                let theirs: Vec<MegatronParam> = model
                    .params()
                    .params()
                    .iter()
                    .map(|p| MegatronParam {
                        name: p.name.clone(),
                        shape: p.global_shape.clone(),
                        partition: partition_of(p),
                    })
                    .collect();
                assert_eq!(
                    ours, theirs,
                    "bias {qkv_bias} qk-norm {qk_norm} tied {tied} pp {pp}/{pp_size}"
                );
            }
        }
    }
}
