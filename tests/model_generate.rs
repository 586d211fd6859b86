//! KV-cache decoding against full recompute, and greedy generation.

mod model_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::model::ModelConfig;
use mbridge::model::{generate, generate_no_cache, ForwardOpts, GptModel, ParallelLayout};
use model_common::{tiny_gpt, tiny_llama, tiny_qwen_window};

fn build(cfg: &ModelConfig, layout: ParallelLayout, seed: u64, dtype: DType) -> GptModel {
    GptModel::new(cfg, layout, seed, dtype, &Device::Cpu).unwrap()
}

#[test]
fn kv_cache_equals_full_recompute() {
    for cfg in [tiny_llama(), tiny_qwen_window(), tiny_gpt()] {
        // Large weights so greedy decoding does not collapse onto one token.
        let cfg = ModelConfig { init_method_std: 1.0, ..cfg };
        let m = build(&cfg, ParallelLayout::single(), 11, DType::F64);
        let dev = Device::Cpu;
        let seq = [4u32, 17, 3, 29, 8, 8, 1, 30, 12, 5];
        let full = m
            .forward(
                &Tensor::new(&seq[..], &dev).unwrap().unsqueeze(0).unwrap(),
                &ForwardOpts::default(),
            )
            .unwrap();
        let mut cache = m.new_cache();
        let mut pieces = Vec::new();
        for chunk in [&seq[..4], &seq[4..5], &seq[5..9], &seq[9..]] {
            let t = Tensor::new(chunk, &dev).unwrap().unsqueeze(0).unwrap();
            pieces.push(m.forward_cached(&t, &mut cache).unwrap());
        }
        assert_eq!(cache.len(), seq.len());
        let inc = Tensor::cat(&pieces, 1).unwrap();
        let d = (inc - full).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "cached logits differ by {d}");

        let prompt = [4u32, 17, 3];
        let cached = generate(&m, &prompt, 8, None).unwrap();
        assert_eq!(cached.len(), 8);
        let distinct: std::collections::HashSet<_> = cached.iter().collect();
        assert!(distinct.len() > 1, "degenerate generation {cached:?}");
        assert_eq!(cached, generate_no_cache(&m, &prompt, 8, None).unwrap());
        // Stops right after EOD (and includes it).
        let eod = cached[2];
        let first = cached.iter().position(|&t| t == eod).unwrap();
        assert_eq!(generate(&m, &prompt, 8, Some(eod)).unwrap(), cached[..=first].to_vec());
    }
}
