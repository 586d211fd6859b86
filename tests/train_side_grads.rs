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

/// `model.gradient_accumulation_fusion = false` gives each micro-batch's weight gradients
/// buffers of their own, added to the sum in a pass of their own; the curve is the fused
/// one (in-place accumulation, the default) up to rounding, in the parameters' dtype and in
/// FP8 (whose weight-gradient GEMM adds into the sum on its own path).
#[test]
fn accumulation_fusion_off_follows_the_fused_curve() {
    let selective = "model.recompute_granularity=\"selective\"";
    let fp8: &[&str] = &[
        "mixed_precision=bf16_with_fp8_current_scaling_mixed",
        "mixed_precision.fp8_param_gather=false",
        "mixed_precision.fp8_param=false",
        "mixed_precision.first_last_layers_bf16=false",
    ];
    for (extra, tol) in [(&[selective][..], 1e-6), (fp8, 1e-3)] {
        let fused = curve(extra);
        let unfused = curve(&[extra, &["model.gradient_accumulation_fusion=false"]].concat());
        assert_eq!(fused.len(), unfused.len());
        for ((it, x), (_, y)) in fused.iter().zip(&unfused) {
            let rel = (x - y).abs() / x.abs();
            assert!(rel <= tol, "{extra:?} iteration {it}: unfused {y} vs fused {x}");
        }
    }
}
