//! `--nproc-per-node N`: start one process per rank on this node with torchrun's environment,
//! prefix their output, forward SIGTERM/SIGINT, and fail fast when one rank fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Set in children so they train instead of spawning again.
pub const LAUNCHED_ENV: &str = "MBRIDGE_LAUNCHED";

/// Where this node sits in a multi-node launch.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// True inside a process started by [`spawn_ranks`].
pub fn is_child() -> bool {
    std::env::var_os(LAUNCHED_ENV).is_some()
}

/// Run this executable once per local rank with `args`; returns the first failing rank's exit
/// code (0 when all succeed). Output lines are prefixed with `[rank R]` when N > 1.
pub fn spawn_ranks(spec: &SpawnSpec, args: &[String]) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot find the mbridge executable")?;
    let world = spec.nproc_per_node * spec.nnodes;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let mut children: Vec<Child> = Vec::new();
    let mut pumps = Vec::new();
    for local in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local;
        let mut child = Command::new(&exe)
            .args(args)
            .env(LAUNCHED_ENV, "1")
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string())
            .env("GROUP_RANK", spec.node_rank.to_string())
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", spec.master_port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        let prefix = if world > 1 { format!("[rank {rank}] ") } else { String::new() };
        pumps.push(pump(child.stdout.take().unwrap(), prefix.clone(), false));
        pumps.push(pump(child.stderr.take().unwrap(), prefix, true));
        children.push(child);
    }
    let code = supervise(&mut children, &stop)?;
    for p in pumps {
        let _ = p.join();
    }
    Ok(code)
}

/// Wait for all children; on a failure or a signal, stop the rest.
fn supervise(children: &mut [Child], stop: &AtomicBool) -> Result<i32> {
    let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    let mut status: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut first_failure: Option<i32> = None;
    let mut forwarded = false;
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                if let Some(s) = c.try_wait()? {
                    status[i] = Some(s);
                    if !s.success() && first_failure.is_none() {
                        first_failure = Some(s.code().unwrap_or(1));
                        tracing::error!("rank process {i} failed ({s}); stopping the others");
                        signal_all(&pids, &status, Signal::SIGTERM);
                    }
                }
            }
        }
        if status.iter().all(Option::is_some) {
            return Ok(first_failure.unwrap_or(0));
        }
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            signal_all(&pids, &status, Signal::SIGTERM);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_all(pids: &[i32], status: &[Option<ExitStatus>], sig: Signal) {
    for (pid, s) in pids.iter().zip(status) {
        if s.is_none() {
            let _ = kill(Pid::from_raw(*pid), sig);
        }
    }
}

fn pump<R: Read + Send + 'static>(
    from: R,
    prefix: String,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let text = format!("{prefix}{line}\n");
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(text.as_bytes())
            } else {
                std::io::stdout().lock().write_all(text.as_bytes())
            };
        }
    })
}
