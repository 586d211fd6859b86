//! Stops a rank whose GPU collectives can never complete, with an error that says why.
//!
//! Over NCCL a rank waits for a dead or hung peer inside the GPU stream, where no receive
//! timeout can reach it: the training thread blocks in the next synchronisation forever. The
//! CPU rendezvous connections still tell when a peer process ended, and whether it said
//! goodbye first ([`crate::parallel::comm::TcpWorld::farewell`]). A watchdog thread ends the
//! process when a peer ended without a goodbye (crashed, killed, failed), or when this rank,
//! once training started ([`arm`]), made no progress ([`beat`]: collectives issued,
//! iterations finished, checkpoint files written) for `dist.distributed_timeout_minutes`, as
//! torch's NCCL watchdog does for Megatron.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();
static LAST_BEAT_MS: AtomicU64 = AtomicU64::new(0);
/// Whether the no-progress limit applies: from the first training iteration on, so loading a
/// large checkpoint or building the model (local work of any length) is never taken for a
/// hang.
static ARMED: AtomicBool = AtomicBool::new(false);

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Records that this rank made progress.
pub fn beat() {
    LAST_BEAT_MS.store(now_ms(), Ordering::Relaxed);
}

/// Starts the no-progress limit (the training loop begins); also a [`beat`].
pub fn arm() {
    beat();
    ARMED.store(true, Ordering::Relaxed);
}

/// Time since the last [`beat`] (zero before [`arm`]).
fn idle() -> Duration {
    if !ARMED.load(Ordering::Relaxed) {
        return Duration::ZERO;
    }
    Duration::from_millis(now_ms().saturating_sub(LAST_BEAT_MS.load(Ordering::Relaxed)))
}

/// Why rank `rank` must stop, if it must: a peer that ended without finishing its run, or no
/// progress for longer than `timeout`.
pub fn verdict(
    rank: usize,
    failed_peers: &[(usize, String)],
    idle: Duration,
    timeout: Duration,
) -> Option<String> {
    if let Some((peer, why)) = failed_peers.first() {
        return Some(format!(
            "rank {rank}: rank {peer} is gone without finishing its run ({why}); collectives \
             and pipeline transfers with it can never complete"
        ));
    }
    (idle > timeout).then(|| {
        format!(
            "rank {rank}: no progress for {:.0} s (dist.distributed_timeout_minutes = {}): a \
             collective or pipeline transfer is waiting for a rank that hangs",
            idle.as_secs_f64(),
            timeout.as_secs() / 60
        )
    })
}

/// The running watchdog; dropping it stops it.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
}

/// How long a peer's failure is left to the training thread to report first (a CPU-side
/// receive from that peer fails at once, with the operation named).
const GRACE: Duration = Duration::from_secs(2);

impl Watchdog {
    /// Starts watching: `failed_peers` lists peers that ended without a goodbye.
    pub fn start(
        rank: usize,
        failed_peers: impl Fn() -> Vec<(usize, String)> + Send + 'static,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        beat();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new().name(format!("mbridge-watchdog-{rank}")).spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let failed = failed_peers();
                let Some(msg) = verdict(rank, &failed, idle(), timeout) else { continue };
                if !failed.is_empty() {
                    std::thread::sleep(GRACE);
                }
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                tracing::error!("{msg}; exiting");
                eprintln!("error: {msg}; exiting");
                // No destructors or atexit handlers: the CUDA/NCCL teardown would wait for
                // the very kernels that cannot finish.
                // SAFETY: `_exit` ends the process immediately; nothing runs afterwards.
                unsafe { libc::_exit(1) };
            }
        })?;
        Ok(Self { stop })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_names_the_failed_peer_before_the_timeout() {
        let t = Duration::from_secs(600);
        assert_eq!(verdict(0, &[], Duration::from_secs(599), t), None);
        let hung = verdict(2, &[], Duration::from_secs(601), t).unwrap();
        assert!(hung.contains("rank 2: no progress for 601 s"), "{hung}");
        assert!(hung.contains("distributed_timeout_minutes = 10"), "{hung}");
        let gone = verdict(0, &[(3, "connection closed".into())], Duration::ZERO, t).unwrap();
        assert!(gone.contains("rank 3 is gone without finishing its run"), "{gone}");
    }
}
