//! `kill -9` of rank 1 of a two-process TP=2 run while a checkpoint save is under way (every
//! rank writes its own shards into rank 0's `.iter_N.tmp-<pid>/`). Rank 0 must fail on its own
//! with an error naming the lost rank, not hang; the `--nproc-per-node` launcher must stop
//! and fail; no partial directory may be taken for a checkpoint; and the same command then
//! resumes from the newest complete one.
//!
//! Eight seeded rounds alternate ranks started by hand with torchrun's environment (nothing
//! else stops rank 0) and `mbridge pretrain --nproc-per-node 2`, with synchronous and async
//! saves; each kill lands within 1 ms of a save's temporary directory appearing.

mod cli_common;

use cli_common::Rng;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mbridge::ckpt::{find_checkpoint, is_complete, load_tensors, read_tracker, TrainState};

/// How long a rank that lost its peer may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn pretrain(run: &Path, async_save: bool, train_iters: u64) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("mbridge"));
    cmd.args(["pretrain", "--recipe", "tiny_llama", "logger.log_interval=1"])
        .args(["validation.eval_iters=0", "++checkpoint.save_interval=1"])
        .arg("model.tensor_model_parallel_size=2")
        .arg(format!("train.train_iters={train_iters}"))
        .arg(format!("++checkpoint.async_save={async_save}"))
        .arg(format!("++checkpoint.save={}", run.display()))
        .arg(format!("++checkpoint.load={}", run.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        cmd.env_remove(var);
    }
    cmd
}

/// All output lines of `child` (stdout and stderr), collected by two threads.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    let err = BufReader::new(child.stderr.take().unwrap());
    let tx2 = tx.clone();
    std::thread::spawn(move || out.lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    std::thread::spawn(move || err.lines().map_while(Result::ok).for_each(|l| drop(tx2.send(l))));
    rx
}

/// The rank-0 process's save directory while a save is under way (`.iter_N.tmp-<pid>`).
fn save_in_progress(run: &Path, rank0_pid: u32) -> bool {
    let tag = format!(".tmp-{rank0_pid}");
    std::fs::read_dir(run).is_ok_and(|d| {
        d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(&tag))
    })
}

/// Waits until `rank0_pid` has started its `(skip + 1)`th save; panics when `alive` says the
/// run is gone or nothing happens in time.
fn wait_for_save(run: &Path, rank0_pid: u32, skip: usize, alive: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut was) = (0, false);
    loop {
        let now = save_in_progress(run, rank0_pid);
        if now && !was {
            if seen == skip {
                return;
            }
            seen += 1;
        }
        was = now;
        assert!(Instant::now() < deadline, "no save started");
        assert!(alive(), "the run exited before its saves");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Waits for `child` to exit within `limit`; kills it and panics on a hang.
fn exit_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {limit:?} of its peer's death (hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks the run directory after a kill: every `iter_*` entry is complete, the tracker (if
/// any) names the newest, and that checkpoint loads. Returns the step a resume starts after.
fn check_run_dir(run: &Path) -> Option<u64> {
    let mut steps = Vec::new();
    for e in std::fs::read_dir(run).unwrap().filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("iter_") {
            assert!(is_complete(&e.path()), "`{name}` looks like a checkpoint but is incomplete");
            steps.push(step.parse::<u64>().unwrap());
        }
    }
    let tracked = read_tracker(run).unwrap();
    assert_eq!(tracked, steps.iter().max().copied(), "the tracker is not the newest checkpoint");
    let step = tracked?;
    let dir = find_checkpoint(run, None).unwrap().expect("no loadable checkpoint");
    assert!(load_tensors(&dir, "model").unwrap().len() > 5, "{}", dir.display());
    load_tensors(&dir, "optimizer").unwrap();
    let st: TrainState =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train_state.json")).unwrap())
            .unwrap();
    assert_eq!(st.step, step, "the newest complete checkpoint is not the one the tracker names");
    Some(step)
}

fn first_iteration(lines: &[String]) -> Option<u64> {
    let l = lines.iter().find(|l| l.contains(" iteration ") && l.contains("lm loss"))?;
    l.split(" iteration ").nth(1)?.split('/').next()?.trim().parse().ok()
}

/// The pid of the child of `parent` whose environment has `RANK=rank`.
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    let want = format!("RANK={rank}");
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // pid (comm) state ppid ...: the comm may hold spaces, so split after the last ')'.
        let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        (ppid == parent && environ.split(|b| *b == 0).any(|v| v == want.as_bytes())).then_some(pid)
    })
}

/// Ranks started by hand with torchrun's environment (nothing but the lost peer stops rank
/// 0): kills rank 1 once rank 0's `skip + 1`th save is under way, plus `delay`; checks that
/// rank 0 fails on its own, naming rank 1. Returns rank 0's output.
fn round_by_hand(run: &Path, async_save: bool, skip: usize, delay: Duration) -> Vec<String> {
    let port = free_port().to_string();
    let mut ranks: Vec<Child> = (0..2)
        .map(|rank| {
            pretrain(run, async_save, 1000)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .spawn()
                .unwrap()
        })
        .collect();
    let rank0_lines = lines_of(&mut ranks[0]);
    let _rank1_lines = lines_of(&mut ranks[1]);
    let rank0_pid = ranks[0].id();
    wait_for_save(run, rank0_pid, skip, &mut || {
        ranks.iter_mut().all(|c| c.try_wait().unwrap().is_none())
    });
    std::thread::sleep(delay);
    ranks[1].kill().unwrap(); // SIGKILL
    ranks[1].wait().unwrap();
    let status = exit_within(&mut ranks[0], EXIT_WITHIN, "rank 0");
    assert!(!status.success(), "rank 0 exited successfully after losing rank 1");
    let out: Vec<String> = rank0_lines.iter().collect();
    // A receive and a send both say so.
    let last = out.iter().rev().find(|l| l.starts_with("error:"));
    assert!(
        last.is_some_and(|l| l.contains("rank 1 is gone")),
        "rank 0's error does not name the lost rank:\n{}",
        out.join("\n")
    );
    out
}

/// `mbridge pretrain --nproc-per-node 2`: kills the launcher's child with `RANK=1` the same
/// way; checks that the launcher fails (it returns once both ranks have exited). Returns the
/// launcher's output.
fn round_launched(run: &Path, async_save: bool, skip: usize, delay: Duration) -> Vec<String> {
    let port = free_port().to_string();
    let mut launcher = pretrain(run, async_save, 1000)
        .args(["--nproc-per-node", "2", "--master-port", &port])
        .spawn()
        .unwrap();
    let launcher_lines = lines_of(&mut launcher);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (rank0, rank1) = loop {
        if let (Some(a), Some(b)) = (rank_pid(launcher.id(), 0), rank_pid(launcher.id(), 1)) {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "the launcher started no rank processes");
        assert!(launcher.try_wait().unwrap().is_none(), "the launcher exited early");
        std::thread::sleep(Duration::from_millis(5));
    };
    wait_for_save(run, rank0, skip, &mut || launcher.try_wait().unwrap().is_none());
    std::thread::sleep(delay);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(rank1 as i32), nix::sys::signal::SIGKILL)
        .unwrap();
    let status = exit_within(&mut launcher, EXIT_WITHIN, "the launcher");
    assert!(!status.success(), "the launch succeeded although rank 1 was killed");
    let out: Vec<String> = launcher_lines.iter().collect();
    assert!(out.iter().any(|l| l.contains("rank process 1 failed")), "{}", out.join("\n"));
    out
}

#[test]
fn kill_9_of_rank_1_mid_save_fails_the_run_and_leaves_a_resumable_checkpoint() {
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5D);
    let mut newest: Option<u64> = None;
    // Both ways of starting ranks, each with synchronous and asynchronous saves, twice; the
    // kill lands 0–1 ms after the first to third save of the round began.
    for round in 0..8 {
        let async_save = round % 4 >= 2;
        let skip = (rng.next() % 3) as usize;
        let delay = Duration::from_micros(rng.next() % 1000);
        let out = if round % 2 == 0 {
            round_by_hand(&run, async_save, skip, delay)
        } else {
            round_launched(&run, async_save, skip, delay)
        };
        let first = first_iteration(&out).expect("the round trained no step");
        assert_eq!(
            first,
            newest.map_or(1, |s| s + 1),
            "round {round} did not resume after {newest:?}"
        );
        let step = check_run_dir(&run);
        eprintln!(
            "round {round} ({}, async {async_save}): trained from {first}, newest checkpoint {step:?}, {:.1} s",
            if round % 2 == 0 { "by hand" } else { "launcher" },
            secs(start)
        );
        newest = step.or(newest);
    }

    // The same command resumes from the newest complete checkpoint and runs to the end.
    let step = newest.expect("no round completed a checkpoint");
    let port = free_port().to_string();
    let out = pretrain(&run, false, step + 2)
        .args(["--nproc-per-node", "2", "--master-port", &port])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = text.lines().map(String::from).collect();
    assert_eq!(first_iteration(&lines), Some(step + 1), "{text}");
    assert_eq!(check_run_dir(&run), Some(step + 2));
    eprintln!("resumed to {} in {:.1} s", step + 2, secs(start));
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}
