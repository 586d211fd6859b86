//! SIGTERM with `train.exit_signal_handler`: finish the step, save, exit 0 — then resume.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts an endless tiny run with the exit signal handler and `extra` overrides, sends it
/// `signal` (as `kill` spells it) after two iterations, and checks it saved and exited 0.
fn train_until_signalled(extra: &[&str], signal: &str) {
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("mbridge"))
        .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=100000"])
        .args(["logger.log_interval=1", "validation.eval_iters=0"])
        .arg("train.exit_signal_handler=true")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = 0;
    for line in lines.by_ref() {
        if line.unwrap().contains(" iteration ") {
            seen += 1;
            if seen == 2 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no training output");
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap().success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}; output: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("successfully saved checkpoint")), "{rest:?}");
}

#[test]
fn sigterm_saves_and_exits_cleanly_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run");
    let save = format!("+checkpoint.save={}", ckpt.display());
    let load = format!("+checkpoint.load={}", ckpt.display());
    train_until_signalled(&[&save, &load], "TERM");
    let step: u64 = std::fs::read_to_string(ckpt.join("latest_checkpointed_iteration.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((2..100000).contains(&step), "saved at {step}");
    // Re-running the same command resumes after the saved step.
    let out = Command::new(assert_cmd::cargo::cargo_bin("mbridge"))
        .args(["pretrain", "--recipe", "tiny_llama", &format!("train.train_iters={}", step + 2)])
        .args(["logger.log_interval=1", "validation.eval_iters=0", &save, &load])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("iteration {:8}/", step + 1)), "{text}");
    assert!(!text.contains(&format!("iteration {:8}/", step)), "{text}");
}

/// `train.exit_signal` picks the signal (here SIGUSR1, which would otherwise kill the process).
#[test]
fn the_configured_exit_signal_saves_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().join("run").display());
    train_until_signalled(&["train.exit_signal=SIGUSR1", &save], "USR1");
    // A name no handler can catch is refused before training.
    let out = Command::new(assert_cmd::cargo::cargo_bin("mbridge"))
        .args(["pretrain", "--recipe", "tiny_llama", "train.exit_signal_handler=true"])
        .arg("train.exit_signal=SIGKILL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`train.exit_signal` = \"SIGKILL\" is not a signal"), "{err}");
}
