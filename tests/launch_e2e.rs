//! `--nproc-per-node`: rank processes over TCP (TP, and TP × PP) train like one process; a
//! failing rank fails the launch with its exit code.

mod cli_common;

use assert_cmd::Command;
use cli_common::lm_losses;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "train.train_iters=6",
            "logger.log_interval=1",
        ])
        .args(["validation.eval_iters=0"])
        .args(args)
        .timeout(std::time::Duration::from_secs(240))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn two_rank_processes_match_one_process() {
    let (ok, one, err) = run(&[]);
    assert!(ok, "{err}");
    let (ok, two, err) = run(&[
        "--nproc-per-node",
        "2",
        "--master-port",
        "29731",
        "model.tensor_model_parallel_size=2",
    ]);
    assert!(ok, "{err}");
    assert!(two.contains("[rank 0]"), "{two}");
    let (a, b) = (lm_losses(&one), lm_losses(&two));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6, "only rank 0 logs: {two}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() / x < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn a_failing_rank_fails_the_launch() {
    // TP=3 does not divide the 4 heads: every rank fails validation (exit 2).
    let (ok, _, err) = run(&[
        "--nproc-per-node",
        "3",
        "--master-port",
        "29741",
        "model.tensor_model_parallel_size=3",
    ]);
    assert!(!ok);
    assert!(err.contains("must be divisible by `model.tensor_model_parallel_size` (3)"), "{err}");
    assert!(err.contains("a rank process failed with exit code 2"), "{err}");
}

#[test]
fn two_rank_processes_with_the_distributed_optimizer_match_one_process() {
    let (ok, one, err) = run(&[]);
    assert!(ok, "{err}");
    let (ok, two, err) = run(&[
        "--nproc-per-node",
        "2",
        "--master-port",
        "29751",
        "ddp.use_distributed_optimizer=true",
        "ddp.overlap_grad_reduce=true",
        "++ddp.bucket_size=5000",
    ]);
    assert!(ok, "{err}");
    assert!(two.contains("> distributed optimizer: DP 2"), "{two}");
    let (a, b) = (lm_losses(&one), lm_losses(&two));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6, "only rank 0 logs: {two}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() / x < 1e-5, "{a:?} vs {b:?}");
    }
}

/// TP=2 × PP=2 rank processes log the one-process curve, from the last pipeline stage as
/// Megatron prints it.
#[test]
fn tp2_pp2_rank_processes_match_one_process() {
    let (ok, one, err) = run(&["train.micro_batch_size=2"]);
    assert!(ok, "{err}");
    let (ok, four, err) = run(&[
        "train.micro_batch_size=2",
        "--nproc-per-node",
        "4",
        "--master-port",
        "29761",
        "model.tensor_model_parallel_size=2",
        "model.pipeline_model_parallel_size=2",
    ]);
    assert!(ok, "{err}");
    // Global rank 2 is TP rank 0 of the last stage (tp fastest, then dp, then pp).
    assert!(four.contains("[rank 2]"), "the last stage logs: {four}");
    let (a, b) = (lm_losses(&one), lm_losses(&four));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6, "one rank logs: {four}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() / x <= 1e-5, "{a:?} vs {b:?}");
    }
}
