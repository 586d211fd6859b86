//! Rough CPU speed probe of forward+backward (ignored; run with `--ignored --nocapture`).

mod model_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::model::ModelConfig;
use mbridge::model::{loss_for_microbatch, GptModel, Microbatch, ParallelLayout};
use std::time::Instant;

#[test]
#[ignore]
fn forward_backward_speed() {
    let layers: usize = std::env::var("MB_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let hidden: usize = std::env::var("MB_HIDDEN").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let s: usize = std::env::var("MB_SEQ").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let cfg = ModelConfig {
        num_layers: layers,
        hidden_size: hidden,
        ffn_hidden_size: Some(hidden * 8 / 3),
        num_attention_heads: hidden / 64,
        num_query_groups: Some(hidden / 64),
        vocab_size: Some(32768),
        seq_length: s,
        init_method_std: 0.02,
        ..model_common::tiny_llama()
    };
    let m = GptModel::new(&cfg, ParallelLayout::single(), 0, DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..s as u32 + 1).map(|i| (i * 31) % 32768).collect();
    let dev = Device::Cpu;
    let mb = Microbatch {
        tokens: Tensor::from_vec(ids[..s].to_vec(), (1, s), &dev).unwrap(),
        labels: Tensor::from_vec(ids[1..].to_vec(), (1, s), &dev).unwrap(),
        loss_mask: Tensor::ones((1, s), DType::F32, &dev).unwrap(),
        position_ids: None,
        attention_mask: None,
        cu_seqlens: None,
        host_stats: None,
    };
    for _ in 0..3 {
        let t = Instant::now();
        let (sum, count) = loss_for_microbatch(&m, &mb, None).unwrap();
        let f = t.elapsed();
        let _g = (sum / count).unwrap().backward().unwrap();
        eprintln!(
            "fwd {:?} total {:?} ({:.0} tok/s)",
            f,
            t.elapsed(),
            s as f64 / t.elapsed().as_secs_f64()
        );
    }
}

#[test]
#[ignore]
fn op_speed() {
    use candle_core::Var;
    use mbridge::ops;
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 8, 1024, 1024), &dev).unwrap()).unwrap();
    let mask = ops::build_attention_mask(0, 1024, 1024, None, None, &dev).unwrap();
    for _ in 0..2 {
        let t = Instant::now();
        let y = ops::masked_softmax_composite(x.as_tensor(), &mask, 0.125).unwrap();
        let f = t.elapsed();
        let _g = (y.sum_all().unwrap()).backward().unwrap();
        eprintln!("composite masked softmax [8,1024,1024]: fwd {:?} total {:?}", f, t.elapsed());
        let t = Instant::now();
        let y = ops::masked_softmax(x.as_tensor(), &mask, 0.125).unwrap();
        let f = t.elapsed();
        let _g = (y.sum_all().unwrap()).backward().unwrap();
        eprintln!("fused masked softmax [8,1024,1024]: fwd {:?} total {:?}", f, t.elapsed());
    }
    let logits =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 1024, 32768), &dev).unwrap()).unwrap();
    let labels = Tensor::arange(0u32, 1024, &dev).unwrap().unsqueeze(0).unwrap();
    let lm = Tensor::ones((1, 1024), DType::F32, &dev).unwrap();
    for _ in 0..2 {
        let t = Instant::now();
        let (s, _) = ops::masked_cross_entropy(&logits, &labels, &lm).unwrap();
        let f = t.elapsed();
        let _g = s.backward().unwrap();
        eprintln!("fused CE [1024, 32768]: fwd {:?} total {:?}", f, t.elapsed());
        let t = Instant::now();
        let flat = logits.as_tensor().reshape((1024, 32768)).unwrap();
        let s = ops::token_cross_entropy_composite(&flat, &labels.flatten_all().unwrap()).unwrap();
        let s = s.sum_all().unwrap();
        let f = t.elapsed();
        let _g = s.backward().unwrap();
        eprintln!("composite CE [1024, 32768]: fwd {:?} total {:?}", f, t.elapsed());
    }
}
