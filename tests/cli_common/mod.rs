//! Helpers for tests that read the `mbridge` binary's training log.

/// The `lm loss` of every training log line in `stdout`, in order.
pub fn lm_losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter(|l| l.contains(" iteration ") && l.contains("lm loss:"))
        .map(|l| {
            let v = l.split("lm loss: ").nth(1).and_then(|r| r.split(' ').next());
            v.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad log line: {l}"))
        })
        .collect()
}
