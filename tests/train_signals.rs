//! SIGTERM with `train.exit_signal_handler`: finish the step, save, exit 0 — then resume.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigterm_saves_and_exits_cleanly_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run");
    let bin = assert_cmd::cargo::cargo_bin("mbridge");
    let save = format!("+checkpoint.save={}", ckpt.display());
    let load = format!("+checkpoint.load={}", ckpt.display());
    let mut child = Command::new(&bin)
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "train.train_iters=100000",
            "logger.log_interval=1",
        ])
        .args(["validation.eval_iters=0", "train.exit_signal_handler=true", &save, &load])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Wait for two iterations, then ask the run to stop.
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
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}; output: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("successfully saved checkpoint")), "{rest:?}");
    let step: u64 = std::fs::read_to_string(ckpt.join("latest_checkpointed_iteration.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((2..100000).contains(&step), "saved at {step}");
    // Re-running the same command resumes after the saved step.
    let out = Command::new(&bin)
        .args(["pretrain", "--recipe", "tiny_llama", &format!("train.train_iters={}", step + 2)])
        .args(["logger.log_interval=1", "validation.eval_iters=0", &save, &load])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("iteration {:8}/", step + 1)), "{text}");
    assert!(!text.contains(&format!("iteration {:8}/", step)), "{text}");
}
