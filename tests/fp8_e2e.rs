//! FP8 training through the binary (`mixed_precision=bf16_with_fp8_current_scaling_mixed`):
//! on the CPU the linear layers' GEMMs quantize their operands value by value (the reference
//! the CUDA FP8 GEMMs are checked against), so a run tracks the bf16 curve closely without
//! equalling it; what the engine does not run is refused by name.

use assert_cmd::Command;

const FP8: [&str; 3] = [
    "mixed_precision=bf16_with_fp8_current_scaling_mixed",
    "mixed_precision.fp8_param_gather=false",
    "mixed_precision.fp8_param=false",
];

/// The training losses of a tiny_llama run with `overrides`, and its stdout.
fn losses(overrides: &[&str]) -> (Vec<f64>, String) {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=12"])
        .args(["logger.log_interval=1", "validation.eval_iters=0", "model.num_layers=4"])
        .args(overrides)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let losses = stdout
        .lines()
        .filter_map(|l| l.split("lm loss: ").nth(1))
        .map(|v| v.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    (losses, stdout)
}

#[test]
fn fp8_training_tracks_bf16_and_keeps_the_first_and_last_layers_in_bf16() {
    let (bf16, _) = losses(&["mixed_precision=bf16_mixed"]);
    let (fp8, plan) = losses(&FP8);
    assert!(plan.contains("precision: FP8 hybrid"), "{plan}");
    // The preset keeps layer 0 and layer 3 in bf16.
    assert!(plan.contains("layers 1..3 of 4"), "{plan}");
    let all = [&FP8[..], &["mixed_precision.first_last_layers_bf16=false"]].concat();
    let (fp8_all, plan_all) = losses(&all);
    assert!(plan_all.contains("layers 0..4 of 4"), "{plan_all}");
    assert_eq!((bf16.len(), fp8.len(), fp8_all.len()), (12, 12, 12));
    for (i, ((b, f), a)) in bf16.iter().zip(&fp8).zip(&fp8_all).enumerate() {
        assert!((b - f).abs() / b < 2e-2, "iteration {}: bf16 {b} vs FP8 {f}", i + 1);
        assert!((b - a).abs() / b < 2e-2, "iteration {}: bf16 {b} vs all-FP8 {a}", i + 1);
    }
    // Quantization changes the curve, and more with every layer in FP8.
    let dist = |x: &[f64]| bf16.iter().zip(x).map(|(b, v)| (b - v).abs()).sum::<f64>();
    assert!(dist(&fp8) > 0.0, "FP8 changed nothing: {fp8:?}");
    assert!(dist(&fp8_all) > 0.0, "FP8 changed nothing: {fp8_all:?}");
    // Unquantized weight gradients are another curve again.
    let (exact_wgrad, _) = losses(&[&all[..], &["mixed_precision.fp8_wgrad=false"]].concat());
    assert_ne!(exact_wgrad, fp8_all);
}

/// FP8 under tensor parallelism (two ranks, with and without sequence parallelism) tracks
/// the one-rank FP8 curve: each rank quantizes its weight shards and a row-parallel layer's
/// input shard with scales of their own, as Transformer Engine does, so the curves differ by
/// FP8 rounding only.
#[test]
fn fp8_with_tensor_parallelism_tracks_one_rank() {
    let fp8 = [&FP8[..], &["mixed_precision.first_last_layers_bf16=false"]].concat();
    // Every FP8 GEMM dimension per rank divisible by 16 (the MLP's 96 of 192).
    let base = [&fp8[..], &["model.ffn_hidden_size=192"]].concat();
    let (one, _) = losses(&base);
    let tp = ["--nproc-per-node", "2", "model.tensor_model_parallel_size=2"];
    for (extra, port) in [(None, "29421"), (Some("model.sequence_parallel=true"), "29431")] {
        let args = [&base[..], &tp, &["--master-port", port], extra.as_slice()].concat();
        let (two, _) = losses(&args);
        assert_eq!(two.len(), one.len(), "{extra:?}");
        for (i, (a, b)) in one.iter().zip(&two).enumerate() {
            assert!(
                (a - b).abs() / a < 2e-2,
                "{extra:?}, iteration {}: TP=1 {a} vs TP=2 {b}",
                i + 1
            );
        }
    }
}

/// Megatron Bridge's FP8 preset as it is (`fp8_param_gather = true`): the FP8 layers' GEMM
/// weights are stored in FP8, cast from the f32 masters, so the curve tracks the run whose
/// bf16 weights are quantized at each step without equalling it (the cast skips the bf16
/// rounding). Either optimizer, and a run resumed from its checkpoint continues exactly.
#[test]
fn the_fp8_preset_stores_the_weights_in_fp8_and_resumes_exactly() {
    let preset = ["mixed_precision=bf16_with_fp8_current_scaling_mixed"];
    let (quantized, _) = losses(&FP8);
    let (stored, plan) = losses(&preset);
    assert!(plan.contains("stored in FP8 (`fp8_param`)"), "{plan}");
    let (replicated, _) = losses(&[&preset[..], &["ddp.use_distributed_optimizer=false"]].concat());
    assert_eq!(stored.len(), 12);
    for (i, (q, s)) in quantized.iter().zip(&stored).enumerate() {
        assert!((q - s).abs() / q < 2e-2, "iteration {}: bf16 weights {q} vs stored {s}", i + 1);
    }
    assert_ne!(quantized, stored);
    assert_eq!(stored, replicated, "the distributed optimizer's DP=1 step is the replicated one");
    // Interrupted at 6 and resumed: iterations 7..12 as in the uninterrupted run.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = format!("checkpoint.save={}", dir.path().join("run").display());
    let load = format!("checkpoint.load={}", dir.path().join("run").display());
    let first =
        [&preset[..], &[ckpt.as_str(), "checkpoint.save_interval=6", "train.exit_interval=6"]]
            .concat();
    let (head, _) = losses(&first);
    assert_eq!(head, stored[..6]);
    let (tail, _) = losses(&[&preset[..], &[load.as_str()]].concat());
    assert_eq!(tail, stored[6..], "resumed run");
}

/// Megatron Bridge keeps `fp8_param` and `fp8_param_gather` in sync (setting either sets
/// both): after the preset, turning either off keeps the weights in bf16.
#[test]
fn either_fp8_param_switch_turns_the_stored_weights_off() {
    let stored = |overrides: &[&str]| {
        let out = Command::cargo_bin("mbridge")
            .unwrap()
            .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=1"])
            .args(["validation.eval_iters=0", "model.num_layers=4"])
            .arg("mixed_precision=bf16_with_fp8_current_scaling_mixed")
            .args(overrides)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).contains("stored in FP8")
    };
    assert!(stored(&[]));
    assert!(!stored(&["mixed_precision.fp8_param_gather=false"]));
    assert!(!stored(&["mixed_precision.fp8_param=false"]));
    assert!(stored(&["mixed_precision.fp8_param_gather=false", "mixed_precision.fp8_param=true"]));
}

/// FP8 primary weights with the distributed optimizer over two data-parallel ranks: each rank
/// casts the gathered f32 masters itself, so both hold the same FP8 weights and the curve
/// tracks one rank's.
#[test]
fn fp8_primary_weights_with_data_parallelism_track_one_rank() {
    let base = ["mixed_precision=bf16_with_fp8_current_scaling_mixed", "model.ffn_hidden_size=192"];
    let (one, _) = losses(&base);
    let dp = ["--nproc-per-node", "2", "--master-port", "29441"];
    let (two, _) = losses(&[&base[..], &dp].concat());
    assert_eq!(two.len(), one.len());
    for (i, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!((a - b).abs() / a < 1e-2, "iteration {}: DP=1 {a} vs DP=2 {b}", i + 1);
    }
}

#[test]
fn what_the_fp8_engine_does_not_run_is_refused() {
    let refused = |overrides: &[&str], expected: &str| {
        Command::cargo_bin("mbridge")
            .unwrap()
            .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=1"])
            .args(overrides)
            .assert()
            .failure()
            .stderr(predicates::str::contains(expected));
    };
    // FP8 primary weights take bf16 gradients.
    refused(
        &["mixed_precision.fp8=hybrid", "mixed_precision.fp8_param=true"],
        "use them with bf16 parameters",
    );
    refused(&["mixed_precision=bf16_with_fp8_delayed_scaling_mixed"], "\"delayed\"");
    refused(&["mixed_precision=bf16_with_nvfp4_mixed"], "FP4");
    refused(&[&FP8[..], &["model.seq_length=62"]].concat(), "tokens per micro-batch");
    // fp8 on fp32 parameters (it used to be ignored).
    refused(&["mixed_precision.fp8=hybrid"], "bf16 or fp16");
}
