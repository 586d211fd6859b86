//! Shared helpers of the parallel tests: run ranks as threads with a hard deadline.
#![allow(dead_code)]

use mbridge::parallel::comm::LocalWorld;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Receive timeout of the in-process worlds in tests.
pub const COMM_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `f(rank, world)` on `n` threads of one [`LocalWorld`]; returns the results in rank
/// order. Panics (never hangs) when a rank fails or does not finish within `deadline`; a
/// failing rank is marked gone so that its peers fail at once too.
pub fn run_ranks<T, F>(n: usize, deadline: Duration, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, Arc<LocalWorld>) -> anyhow::Result<T> + Send + Sync + 'static,
{
    let world = LocalWorld::new(n, COMM_TIMEOUT);
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for rank in 0..n {
        let (tx, world, f) = (tx.clone(), world.clone(), f.clone());
        std::thread::spawn(move || {
            let out =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rank, world.clone())));
            let out = match out {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(p) => Err(p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into())),
            };
            if let Err(e) = &out {
                world.abort_rank(rank, e);
            }
            let _ = tx.send((rank, out));
        });
    }
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut errors = Vec::new();
    let end = std::time::Instant::now() + deadline;
    for _ in 0..n {
        let left = end.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((rank, Ok(v))) => results[rank] = Some(v),
            Ok((rank, Err(e))) => errors.push(format!("rank {rank}: {e}")),
            Err(_) => {
                let missing: Vec<usize> = (0..n).filter(|&r| results[r].is_none()).collect();
                panic!("ranks {missing:?} did not finish within {deadline:?}; errors: {errors:?}");
            }
        }
    }
    if !errors.is_empty() {
        panic!("{}", errors.join("\n"));
    }
    results.into_iter().map(|r| r.expect("every rank reported")).collect()
}

/// Like [`run_ranks`] but returns each rank's outcome (errors as strings) instead of
/// panicking on failures.
pub fn try_ranks<T, F>(n: usize, deadline: Duration, f: F) -> Vec<Result<T, String>>
where
    T: Send + 'static,
    F: Fn(usize, Arc<LocalWorld>) -> anyhow::Result<T> + Send + Sync + 'static,
{
    run_ranks(n, deadline, move |rank, world| Ok(f(rank, world).map_err(|e| format!("{e:#}"))))
}
