//! TP shards and PP stages: layouts, seeded init per shard, stage chaining.

mod model_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::model::ModelConfig;
use mbridge::model::{ForwardOpts, GptModel, ParallelLayout};
use model_common::{tiny_llama, tiny_qwen_window};

fn build(cfg: &ModelConfig, layout: ParallelLayout, seed: u64, dtype: DType) -> GptModel {
    GptModel::new(cfg, layout, seed, dtype, &Device::Cpu).unwrap()
}

fn tp(rank: usize, size: usize) -> ParallelLayout {
    ParallelLayout { tp_rank: rank, tp_size: size, pp_rank: 0, pp_size: 1 }
}

#[test]
fn tp_shards_are_slices_of_the_tp1_init() {
    let cfg = tiny_llama();
    let full = build(&cfg, ParallelLayout::single(), 7, DType::F32);
    for rank in 0..2 {
        let m = build(&cfg, tp(rank, 2), 7, DType::F32);
        let get = |m: &GptModel, n: &str| m.params().get(n).unwrap().var.as_tensor().clone();
        let eq =
            |a: &Tensor, b: &Tensor| a.to_vec2::<f32>().unwrap() == b.to_vec2::<f32>().unwrap();
        let qkv = "decoder.layers.0.self_attention.linear_qkv.weight";
        assert!(eq(&get(&m, qkv), &get(&full, qkv).narrow(0, rank * 16, 16).unwrap()));
        let proj = "decoder.layers.1.self_attention.linear_proj.weight";
        assert!(eq(&get(&m, proj), &get(&full, proj).narrow(1, rank * 8, 8).unwrap()));
        let fc1 = "decoder.layers.0.mlp.linear_fc1.weight";
        let f = get(&full, fc1);
        let want = Tensor::cat(
            &[f.narrow(0, rank * 12, 12).unwrap(), f.narrow(0, 24 + rank * 12, 12).unwrap()],
            0,
        )
        .unwrap();
        assert!(eq(&get(&m, fc1), &want));
        let emb = "embedding.word_embeddings.weight";
        assert!(eq(&get(&m, emb), &get(&full, emb).narrow(0, rank * 16, 16).unwrap()));
        let err =
            m.forward(&Tensor::new(&[[1u32]], &Device::Cpu).unwrap(), &ForwardOpts::default());
        assert!(err.unwrap_err().to_string().contains("TP=2"));
    }
    let bad = ModelConfig { num_query_groups: Some(1), ..cfg };
    let err = GptModel::new(&bad, tp(0, 2), 0, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("num_query_groups"), "{err}");
}

#[test]
fn pipeline_stages_use_global_layer_numbers() {
    let cfg = ModelConfig { num_layers: 4, ..tiny_qwen_window() };
    let stage = |pp_rank| {
        build(&cfg, ParallelLayout { tp_rank: 0, tp_size: 1, pp_rank, pp_size: 2 }, 3, DType::F32)
    };
    let (s0, s1) = (stage(0), stage(1));
    assert_eq!(s0.layer_numbers(), &[0, 1]);
    assert_eq!(s1.layer_numbers(), &[2, 3]);
    assert!(s0.params().get("embedding.word_embeddings.weight").is_some());
    assert!(s0.params().get("output_layer.weight").is_none());
    assert!(s1.params().get("embedding.word_embeddings.weight").is_none());
    assert!(s1.params().get("decoder.layers.3.mlp.linear_fc2.weight").is_some());
    // Tied model: the last stage holds Megatron's shared copy of the embedding.
    let out = s1.params().get("output_layer.weight").unwrap();
    assert!(out.shared_embedding);
    // Same seed ⇒ stage 1's layer 2 equals layer 2 of the whole model.
    let whole = build(&cfg, ParallelLayout::single(), 3, DType::F32);
    let n = "decoder.layers.2.self_attention.linear_qkv.weight";
    let a = s1.params().get(n).unwrap().var.as_tensor().to_vec2::<f32>().unwrap();
    let b = whole.params().get(n).unwrap().var.as_tensor().to_vec2::<f32>().unwrap();
    assert_eq!(a, b);
    let uneven = ModelConfig { num_layers: 5, ..cfg.clone() };
    let err = GptModel::new(
        &uneven,
        ParallelLayout { tp_rank: 0, tp_size: 1, pp_rank: 0, pp_size: 2 },
        0,
        DType::F32,
        &Device::Cpu,
    );
    assert!(err.is_err());
    let first = ModelConfig { num_layers: 5, num_layers_in_first_pipeline_stage: Some(1), ..cfg };
    let l = mbridge::model::stage_layers(&first, 2, 3).unwrap();
    assert_eq!(l, vec![3, 4]);
}

/// Chaining the stages of a PP=2 model equals the PP=1 model built from the same seed
/// (tied and untied; the tied copy on the last stage starts equal to the embedding).
#[test]
fn pipeline_stages_chain_to_the_whole_model() {
    for base in [tiny_llama(), tiny_qwen_window()] {
        let cfg = ModelConfig { num_layers: 4, ..base };
        let dev = Device::Cpu;
        let whole = build(&cfg, ParallelLayout::single(), 9, DType::F64);
        let stage = |pp_rank| {
            let layout = ParallelLayout { tp_rank: 0, tp_size: 1, pp_rank, pp_size: 2 };
            build(&cfg, layout, 9, DType::F64)
        };
        let tokens = Tensor::new(&[[3u32, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]], &dev).unwrap();
        let opts = ForwardOpts::default();
        let hidden = stage(0).forward_stage(&tokens, &opts, None).unwrap();
        assert_eq!(hidden.dims(), &[2, 6, 16]);
        let logits = stage(1).forward_stage(&hidden, &opts, None).unwrap();
        let want = whole.forward(&tokens, &opts).unwrap();
        let d = (logits - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
        assert!(stage(1).forward(&hidden, &opts).is_err(), "forward needs the whole model");
    }
}
