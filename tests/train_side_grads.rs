//! Gradients that arrive outside candle's graph (recomputed segments, written-out layer
//! backwards) are summed over the micro-batches of a step as they arrive; the trainer's curve
//! with them equals the curve of plain autograd, several micro-batches per step.

mod train_common;

use train_common::tiny_trainer;

fn curve(extra: &[&str]) -> Vec<(u64, f64)> {
    let base = [
        "train.train_iters=6",
        "validation.eval_iters=0",
        "rng.seed=5",
        "train.micro_batch_size=2",
        // Four micro-batches per step: the sum of every one of them must reach the update.
        "train.global_batch_size=8",
    ];
    let overrides: Vec<String> = base.iter().chain(extra).map(|s| s.to_string()).collect();
    tiny_trainer(&overrides).unwrap().train().unwrap().losses
}

#[test]
fn recompute_and_written_out_layers_follow_autograd_over_micro_batches() {
    let plain = curve(&[]);
    let cases: [&[&str]; 2] = [
        // Written-out layer backward (selective recompute turns it on on the CPU).
        &["model.recompute_granularity=\"selective\""],
        // Checkpointed segments, replayed by autograd inside the backward.
        &[
            "model.recompute_granularity=\"full\"",
            "model.recompute_method=\"uniform\"",
            "model.recompute_num_layers=1",
        ],
    ];
    for extra in cases {
        let got = curve(extra);
        assert_eq!(plain.len(), got.len());
        for ((it, x), (_, y)) in plain.iter().zip(&got) {
            let rel = (x - y).abs() / x.abs();
            assert!(rel <= 1e-5, "{extra:?} iteration {it}: loss {y} vs autograd {x}");
        }
    }
}
