//! `kill -9` at pseudo-random moments while `mbridge pretrain` saves every iteration (async save
//! on for half the rounds). After every kill the newest complete checkpoint must load and the
//! tracker must never name an incomplete directory; the next round must resume right after it.
//! Three rounds in four kill within 2 ms of a save's temporary directory appearing, so kills
//! land inside saves by construction (the test counts them), not by luck.

mod cli_common;

use cli_common::Rng;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mbridge::ckpt::{find_checkpoint, is_complete, load_tensors, read_tracker, TrainState};

const ROUNDS: usize = 20;
const BUDGET: Duration = Duration::from_secs(45);

fn spawn(run: &Path, async_save: bool, train_iters: u64) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("mbridge"))
        .args(["pretrain", "--recipe", "tiny_llama", "logger.log_interval=1"])
        .args(["validation.eval_iters=0", "++checkpoint.save_interval=1"])
        .arg(format!("train.train_iters={train_iters}"))
        .arg("++checkpoint.most_recent_k=3")
        .arg(format!("++checkpoint.async_save={async_save}"))
        .arg(format!("++checkpoint.save={}", run.display()))
        .arg(format!("++checkpoint.load={}", run.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Whether process `pid` has a save under way (its `.iter_N.tmp-<pid>` exists; a killed
/// run's leftover temp directory has another pid).
fn save_in_progress(run: &Path, pid: u32) -> bool {
    let tag = format!(".tmp-{pid}");
    std::fs::read_dir(run).is_ok_and(|d| {
        d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(&tag))
    })
}

/// The checks after a kill; returns the step of the checkpoint a resume would use.
fn check_run_dir(run: &Path) -> Option<u64> {
    if let Some(step) = read_tracker(run).unwrap() {
        let dir = run.join(format!("iter_{step:07}"));
        assert!(is_complete(&dir), "tracker names {step}, whose directory is incomplete");
    }
    let dir = find_checkpoint(run, None).unwrap()?;
    assert!(load_tensors(&dir, "model").unwrap().len() > 10, "{}", dir.display());
    load_tensors(&dir, "optimizer").unwrap();
    let st: TrainState =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train_state.json")).unwrap())
            .unwrap();
    assert_eq!(dir.file_name().unwrap().to_string_lossy(), format!("iter_{:07}", st.step));
    Some(st.step)
}

fn first_iteration(lines: &[String]) -> Option<u64> {
    let l = lines.iter().find(|l| l.contains(" iteration ") && l.contains("lm loss"))?;
    l.split("iteration").nth(1)?.split('/').next()?.trim().parse().ok()
}

#[test]
fn kill_9_during_saves_never_leaves_an_unloadable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let start = Instant::now();
    let (mut kills, mut during_save, mut resumes_checked) = (0, 0, 0);
    let mut expected_start: Option<u64> = None;
    for round in 0..ROUNDS {
        if start.elapsed() > BUDGET.mul_f64(0.8) {
            break;
        }
        let (mut child, rx) = spawn(&run, round % 2 == 1, 100_000);
        let mut lines: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        if round % 2 == 0 || round % 4 == 1 {
            // Kill as soon as a save is under way, after a seeded number of saves.
            let skip = rng.next() % 2;
            let mut seen = 0;
            let mut was = false;
            loop {
                let now = save_in_progress(&run, child.id());
                if now && !was {
                    if seen == skip {
                        std::thread::sleep(Duration::from_micros(rng.next() % 2000));
                        break;
                    }
                    seen += 1;
                }
                was = now;
                assert!(Instant::now() < deadline, "no save started in round {round}");
                assert!(child.try_wait().unwrap().is_none(), "run exited early in round {round}");
                std::thread::sleep(Duration::from_micros(200));
            }
        } else {
            // Kill after a random delay (startup, a step or a save).
            std::thread::sleep(Duration::from_millis(200 + rng.next() % 1000));
        }
        let in_save = save_in_progress(&run, child.id());
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        during_save += in_save as usize;
        lines.extend(rx.iter()); // the reader thread ends at EOF, now that the child is dead
        eprintln!(
            "round {round}: killed at {:.1} s, save in progress: {in_save}, first iteration {:?}, expected {expected_start:?}",
            start.elapsed().as_secs_f64(),
            first_iteration(&lines)
        );
        if let (Some(expect), Some(first)) = (expected_start, first_iteration(&lines)) {
            assert_eq!(first, expect, "round {round} did not resume after the checkpoint");
            resumes_checked += 1;
        }
        expected_start = check_run_dir(&run).map(|s| s + 1);
    }
    // Finally the same command runs to the end from the last checkpoint.
    let resume_at = expected_start.expect("no checkpoint was ever completed");
    let (mut child, rx) = spawn(&run, false, resume_at + 1);
    assert!(child.wait().unwrap().success());
    let lines: Vec<String> = rx.iter().collect();
    assert_eq!(first_iteration(&lines), Some(resume_at), "{lines:?}");
    assert_eq!(check_run_dir(&run), Some(resume_at + 1));
    eprintln!(
        "{kills} kills ({during_save} with a save in progress), {resumes_checked} resumes checked, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(kills >= 10, "only {kills} kills fit the time budget");
    assert!(during_save >= kills / 3, "only {during_save} of {kills} kills hit a save");
    assert!(resumes_checked >= kills / 3, "only {resumes_checked} resumes observed");
}
