//! The training building block end to end: plain SGD on `loss_for_microbatch` makes a tiny
//! model learn a repeating sequence (the optimizer proper lives in `train::optimizer`).

mod model_common;

use candle_core::{DType, Device};
use mbridge::model::{generate, loss_for_microbatch, GptModel, Microbatch, ParallelLayout};
use mbridge::ops::DropoutRng;

#[test]
fn sgd_learns_a_repeating_sequence() {
    let cfg = mbridge::config::model::ModelConfig {
        init_method_std: 0.02,
        hidden_dropout: 0.05,
        attention_dropout: 0.05,
        ..model_common::tiny_llama()
    };
    let dev = Device::Cpu;
    let model = GptModel::new(&cfg, ParallelLayout::single(), 1234, DType::F32, &dev).unwrap();
    // Two micro-batches of the periodic stream 5,6,7,8,9,5,6,... at different phases.
    let stream: Vec<i64> = (0..40).map(|i| 5 + i % 5).collect();
    let mb = |phase: usize| {
        let rows = |off: usize| vec![stream[phase + off..phase + off + 12].to_vec()];
        Microbatch::from_rows(&rows(0), &rows(1), &[vec![1.0; 12]], None, &dev).unwrap()
    };
    let batches = [mb(0), mb(3)];
    let lr = 0.5;
    let mut first = None;
    let mut last = f32::MAX;
    for it in 0..60u64 {
        // Megatron reduction: Σ over micro-batches of the token-loss sums / Σ counts.
        let mut total: Option<candle_core::Tensor> = None;
        let mut count = 0.0;
        for (m, b) in batches.iter().enumerate() {
            let rng = DropoutRng::new(1234, it, m as u64);
            let (s, c) = loss_for_microbatch(&model, b, Some(&rng)).unwrap();
            count += c;
            total = Some(match total {
                None => s,
                Some(t) => t.add(&s).unwrap(),
            });
        }
        let loss = (total.unwrap() / count).unwrap();
        let v = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(v);
        last = v;
        let grads = loss.backward().unwrap();
        for p in model.params().params() {
            let g = grads.get(p.var.as_tensor()).unwrap();
            let step = (g * lr).unwrap();
            p.var.set(&p.var.as_tensor().sub(&step).unwrap()).unwrap();
        }
    }
    let first = first.unwrap();
    assert!((first - (32f32).ln()).abs() < 0.3, "initial loss {first} should be ≈ ln(32)");
    assert!(last < 0.3, "loss went from {first} to {last}");
    // Greedy decoding continues the pattern.
    let out = generate(&model, &[5, 6, 7], 5, None).unwrap();
    assert_eq!(out, vec![8, 9, 5, 6, 7]);
}
