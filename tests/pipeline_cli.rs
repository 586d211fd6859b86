//! `mbridge pretrain --nproc-per-node 4` with TP=2 × PP=2 over TCP rank processes logs the
//! loss curve of one process, from the last pipeline stage as Megatron prints it.

mod cli_common;

use assert_cmd::Command;
use cli_common::lm_losses;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=6"])
        .args(["logger.log_interval=1", "validation.eval_iters=0", "train.micro_batch_size=2"])
        .args(args)
        .timeout(std::time::Duration::from_secs(300))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn tp2_pp2_rank_processes_match_one_process() {
    let (ok, one, err) = run(&[]);
    assert!(ok, "{err}");
    let (ok, four, err) = run(&[
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
