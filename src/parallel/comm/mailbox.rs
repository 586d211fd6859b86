//! Per-rank inbox shared by the CPU backends: messages keyed by (source rank, tag), FIFO per
//! key, with timeouts and "peer is gone" errors so no receive can hang forever.

use candle_core::Result;
use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    queues: HashMap<(usize, u64), VecDeque<Vec<u8>>>,
    /// Sources that can send nothing more, with the reason.
    dead: HashMap<usize, String>,
    /// Sources that said goodbye (finished their run) before their connection closed.
    finished: std::collections::HashSet<usize>,
}

/// Messages delivered to one rank.
#[derive(Default)]
pub(crate) struct Mailbox {
    state: Mutex<State>,
    cond: Condvar,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mailbox")
    }
}

impl Mailbox {
    /// Delivers a message from `src` under `tag`.
    pub(crate) fn push(&self, src: usize, tag: u64, bytes: Vec<u8>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.queues.entry((src, tag)).or_default().push_back(bytes);
        self.cond.notify_all();
    }

    /// Records that `src` will send nothing more (its connection closed or failed).
    pub(crate) fn mark_dead(&self, src: usize, reason: String) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.dead.entry(src).or_insert(reason);
        self.cond.notify_all();
    }

    /// Records that `src` finished its run: its connection closing next is no failure.
    pub(crate) fn mark_finished(&self, src: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.finished.insert(src);
    }

    /// Sources whose connection ended without a goodbye (they crashed, were killed or failed),
    /// with the reason, in rank order.
    pub(crate) fn failed(&self) -> Vec<(usize, String)> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(usize, String)> = st
            .dead
            .iter()
            .filter(|(r, _)| !st.finished.contains(r))
            .map(|(r, why)| (*r, why.clone()))
            .collect();
        v.sort();
        v
    }

    /// Takes the oldest message from `src` under `tag`, waiting up to `timeout`; `what`
    /// describes the operation for the error message (rank, group, op).
    pub(crate) fn pop(
        &self,
        src: usize,
        tag: u64,
        timeout: Duration,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(q) = st.queues.get_mut(&(src, tag)) {
                if let Some(m) = q.pop_front() {
                    if q.is_empty() {
                        st.queues.remove(&(src, tag));
                    }
                    return Ok(m);
                }
            }
            if let Some(reason) = st.dead.get(&src) {
                let how = if st.finished.contains(&src) { "finished its run; " } else { "" };
                candle_core::bail!("{}: rank {src} is gone ({how}{reason})", what());
            }
            let now = Instant::now();
            if now >= deadline {
                candle_core::bail!(
                    "{}: timed out after {:.1}s waiting for rank {src}",
                    what(),
                    timeout.as_secs_f64()
                );
            }
            st = self.cond.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}
