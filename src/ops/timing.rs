//! Synchronized timing of sections inside a training step (each layer's forward and
//! backward, the core attention, the head), reported with the iteration's phases by
//! [`crate::train::phase_timer::PhaseTimer`] at debug level. Off (the default) a section is
//! just its closure; on, the device is synchronized around it, which costs overlap.

use candle_core::Device;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Section totals of the current iteration, in first-seen order.
static SECTIONS: Mutex<Vec<(&'static str, f64, usize)>> = Mutex::new(Vec::new());

fn sections_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| tracing::enabled!(tracing::Level::DEBUG))
}

/// Runs `f` as section `name` on `device`: with the timer on, the device is synchronized
/// before and after and the time is added to the iteration's total for `name`; off, this is
/// just `f()`.
pub fn section<T, E: From<candle_core::Error>>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if !sections_on() {
        return f();
    }
    device.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut all = SECTIONS.lock().unwrap_or_else(|e| e.into_inner());
    match all.iter_mut().find(|(n, _, _)| *n == name) {
        Some((_, t, c)) => {
            *t += ms;
            *c += 1;
        }
        None => all.push((name, ms, 1)),
    }
    Ok(out)
}

/// `name total ms (×calls)` of the sections since the last call, and resets them.
pub fn take_sections() -> String {
    let mut all = SECTIONS.lock().unwrap_or_else(|e| e.into_inner());
    let s = all.iter().map(|(n, t, c)| format!("{n} {t:.1} ms (×{c})")).collect::<Vec<_>>();
    all.clear();
    s.join(" | ")
}
