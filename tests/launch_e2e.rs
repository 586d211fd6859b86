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

/// Runs one process with `common` and the `launch`ed rank processes with `common` + `launch`,
/// asserts both succeed with the same 6-step loss curve, and returns the launch's stdout.
fn launched_matches_one_process(common: &[&str], launch: &[&str]) -> String {
    let (ok, one, err) = run(common);
    assert!(ok, "{err}");
    let args: Vec<&str> = common.iter().chain(launch).copied().collect();
    let (ok, many, err) = run(&args);
    assert!(ok, "{err}");
    let (a, b) = (lm_losses(&one), lm_losses(&many));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6, "one rank logs: {many}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() / x < 1e-5, "{a:?} vs {b:?}");
    }
    many
}

#[test]
fn two_rank_processes_match_one_process() {
    let two = launched_matches_one_process(
        &[],
        &["--nproc-per-node", "2", "--master-port", "29731", "model.tensor_model_parallel_size=2"],
    );
    assert!(two.contains("[rank 0]"), "{two}");
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
    let two = launched_matches_one_process(
        &[],
        &[
            "--nproc-per-node",
            "2",
            "--master-port",
            "29751",
            "ddp.use_distributed_optimizer=true",
            "ddp.overlap_grad_reduce=true",
            "++ddp.bucket_size=5000",
        ],
    );
    assert!(two.contains("> distributed optimizer: DP 2"), "{two}");
}

/// TP=2 × PP=2 rank processes log the one-process curve, from the last pipeline stage as
/// Megatron prints it.
#[test]
fn tp2_pp2_rank_processes_match_one_process() {
    let four = launched_matches_one_process(
        &["train.micro_batch_size=2"],
        &[
            "--nproc-per-node",
            "4",
            "--master-port",
            "29761",
            "model.tensor_model_parallel_size=2",
            "model.pipeline_model_parallel_size=2",
        ],
    );
    // Global rank 2 is TP rank 0 of the last stage (tp fastest, then dp, then pp).
    assert!(four.contains("[rank 2]"), "the last stage logs: {four}");
}
