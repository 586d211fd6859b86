//! Pretraining end to end on CPU: loss falls, runs are reproducible, resume is bit-identical.

mod cli_common;
mod train_common;

use assert_cmd::Command;
use cli_common::lm_losses;
use mbridge::config::{load, ConfigRequest};
use mbridge::train::trainer::{ExitReason, TrainOutcome};
use train_common::tiny_trainer;

fn run(overrides: &[String]) -> anyhow::Result<TrainOutcome> {
    tiny_trainer(overrides)?.train()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn pretrain_through_the_binary_logs_and_learns() {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "train.train_iters=30",
            "logger.log_interval=5",
        ])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    let losses = lm_losses(&out);
    assert_eq!(losses.len(), 6, "{out}");
    assert!(losses[5] < losses[0] * 0.8, "loss did not fall: {losses:?}");
    assert!(
        out.contains("iteration       30/      30 | consumed samples:          240 |"),
        "{out}"
    );
    assert!(out.contains("validation loss at iteration 30 on validation set"), "{out}");
    assert!(out.contains("on test set"), "{out}");
}

/// `model.recompute_granularity=selective` trains through the binary (the written-out layer
/// backward, also on the CPU) with the losses of the plain run, and so does forcing the
/// written-out backward on without recompute.
#[test]
fn selective_recompute_trains_like_the_plain_run() {
    let losses = |extra: &[&str], env: Option<&str>| -> Vec<f64> {
        let mut cmd = Command::cargo_bin("mbridge").unwrap();
        if let Some(v) = env {
            cmd.env("MBRIDGE_EXPLICIT_LAYERS", v);
        }
        cmd.args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=10"])
            .args(["logger.log_interval=2", "validation.eval_iters=0"])
            .args(extra);
        let out = cmd.assert().success().get_output().stdout.clone();
        lm_losses(&String::from_utf8(out).unwrap())
    };
    let plain = losses(&[], Some("0"));
    assert_eq!(plain.len(), 5);
    let selective = losses(
        &[
            "model.recompute_granularity=selective",
            "model.recompute_modules=[\"core_attn\",\"mlp\"]",
        ],
        None,
    );
    let explicit = losses(&[], Some("1"));
    for other in [&selective, &explicit] {
        for (a, b) in plain.iter().zip(other) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{plain:?} vs {other:?}");
        }
    }
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let a = run(&args(&["train.train_iters=6", "validation.eval_iters=0"])).unwrap();
    let b = run(&args(&["train.train_iters=6", "validation.eval_iters=0"])).unwrap();
    assert_eq!(a.losses, b.losses);
    let c = run(&args(&["train.train_iters=6", "validation.eval_iters=0", "rng.seed=7"])).unwrap();
    assert_ne!(a.losses, c.losses);
}

#[test]
fn resume_continues_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt").display().to_string();
    let base = ["train.train_iters=12", "validation.eval_iters=0"];
    let full = run(&args(&base)).unwrap();
    let mut first = args(&base);
    first.extend(args(&[
        "+train.exit_interval=5",
        &format!("+checkpoint.save={ckpt}"),
        &format!("+checkpoint.load={ckpt}"),
    ]));
    let stopped = run(&first).unwrap();
    assert_eq!(stopped.reason, ExitReason::ExitInterval);
    assert_eq!(stopped.final_step, 5);
    assert!(dir.path().join("ckpt/iter_0000005/optimizer/index.json").is_file());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ckpt/latest_checkpointed_iteration.txt")).unwrap(),
        "5"
    );
    // The same command again resumes at 6 (exit_interval removed so it runs to the end).
    let mut again = args(&base);
    again.extend(args(&[&format!("+checkpoint.save={ckpt}"), &format!("+checkpoint.load={ckpt}")]));
    let resumed = run(&again).unwrap();
    assert_eq!(resumed.losses.first().unwrap().0, 6);
    assert_eq!(&full.losses[5..], resumed.losses.as_slice());
    assert_eq!(&full.losses[..5], stopped.losses.as_slice());
    // The checkpoint's run_config.toml is itself a loadable recipe.
    let rc = dir.path().join("ckpt/iter_0000012/run_config.toml");
    let req = ConfigRequest { recipe: Some(rc.display().to_string()), ..Default::default() };
    assert_eq!(load(&req).unwrap().cfg.train.train_iters, Some(12));
}

#[test]
fn nan_loss_stops_with_the_iteration() {
    let e = run(&args(&["train.train_iters=3", "model.init_method_std=1e30"])).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("at iteration 1") && msg.contains("stopping"), "{msg}");
}

#[test]
fn missing_checkpoint_is_an_error_when_required() {
    let dir = tempfile::tempdir().unwrap();
    let e = run(&args(&[
        &format!("+checkpoint.load={}", dir.path().display()),
        "checkpoint.exit_on_missing_checkpoint=true",
    ]))
    .unwrap_err();
    assert!(format!("{e:#}").contains("holds no checkpoint"), "{e:#}");
}

/// Megatron Bridge fields mbridge parses but does not act on: one that would change the run is
/// refused through the binary, naming it; a pure tuning knob runs and is named in the debug log.
#[test]
fn fields_mbridge_does_not_act_on_are_refused_or_named() {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=2"])
        .args(["logger.log_params_norm=true", "+checkpoint.non_persistent_save_interval=5"])
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`logger.log_params_norm` = true: the parameters' norm is not logged"),
        "{err}"
    );
    assert!(err.contains("`checkpoint.non_persistent_save_interval` = 5"), "{err}");
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=2"])
        .args(["validation.eval_iters=0", "dataset.num_workers=3"])
        .env("RUST_LOG", "mbridge=debug")
        .assert()
        .success()
        .get_output()
        .clone();
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("`dataset.num_workers` = 3 has no effect in mbridge"), "{log}");
}
