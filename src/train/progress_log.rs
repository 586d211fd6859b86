//! `logger.log_progress`: Megatron's `progress.txt` in the checkpoint directory, one
//! tab-separated line per event, appended by rank 0:
//!
//! ```text
//! 2026-11-29 19:20:01\tJob ID: 4242\t# GPUs: 8\tStarting job
//! 2026-11-29 19:31:40\tJob ID: 4242\t# GPUs: 8\tSaved checkpoint\tIteration: 100\tJob throughput: 512.3 TFLOP/s/GPU\tCumulative throughput: 508.9 TFLOP/s/GPU\tFloating-point operations: 3.15e+18\tTokens (in billions): 0.82
//! ```
//!
//! The job throughput counts this process's work since it started; the cumulative one counts
//! from the first job of the current world size in the file (jobs of a run append to one
//! file across restarts), as megatron's `get_start_time_from_progress_log` reads it back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use chrono::{Local, NaiveDateTime};

use super::log::{timestamp, TIMESTAMP_FORMAT};

/// The progress file of one job (rank 0 of a run that saves checkpoints).
#[derive(Debug)]
pub struct ProgressLog {
    path: PathBuf,
    world_size: usize,
    /// When this job started, and the run's floating-point operations then (from the
    /// checkpoint it resumed, 0 for a new run).
    started: Instant,
    flops_at_start: f64,
}

impl ProgressLog {
    /// Opens `save_dir/progress.txt` for appending and writes this job's `Starting job`.
    pub fn start(save_dir: &Path, world_size: usize) -> Result<Self> {
        std::fs::create_dir_all(save_dir).with_context(|| {
            format!("cannot create the checkpoint directory {}", save_dir.display())
        })?;
        let log = Self {
            path: save_dir.join("progress.txt"),
            world_size,
            started: Instant::now(),
            flops_at_start: 0.0,
        };
        log.append("Starting job")?;
        Ok(log)
    }

    /// The run's floating-point operations when this job started (after a resume).
    pub fn set_flops_at_start(&mut self, flops: f64) {
        self.flops_at_start = flops;
    }

    /// Appends `{time}\tJob ID: {SLURM_JOB_ID}\t# GPUs: {world}\t{message}`.
    pub fn append(&self, message: &str) -> Result<()> {
        let job_id = std::env::var("SLURM_JOB_ID").unwrap_or_default();
        let line =
            format!("{}\tJob ID: {job_id}\t# GPUs: {}\t{message}\n", timestamp(), self.world_size);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        f.write_all(line.as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// The line of a checkpoint save (`prefix`: `Saved checkpoint`, or `Saving async
    /// checkpoint` when it was only submitted): iteration, this job's and the cumulative
    /// throughput, the run's floating-point operations and tokens so far.
    pub fn checkpoint(&self, prefix: &str, iteration: u64, flops: f64, tokens: f64) -> Result<()> {
        let tera = 1e12 * self.world_size as f64;
        let job = (flops - self.flops_at_start) / (self.started.elapsed().as_secs_f64() * tera);
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let (start, start_flops) =
            start_of_world_size(&text, self.world_size).with_context(|| {
                format!("{} has no `Starting job` line for this world size", self.path.display())
            })?;
        let elapsed = (Local::now().naive_local() - start).as_seconds_f64();
        let cumulative = (flops - start_flops) / (elapsed * tera);
        self.append(&format!(
            "{prefix}\tIteration: {iteration}\tJob throughput: {job:.1} TFLOP/s/GPU\t\
             Cumulative throughput: {cumulative:.1} TFLOP/s/GPU\t\
             Floating-point operations: {}\tTokens (in billions): {:.2}",
            exp2(flops),
            tokens / 1e9
        ))
    }
}

/// The time of the first `Starting job` of `world_size` since the world size last changed, and
/// the floating-point operations of the last `Saved checkpoint` before it (megatron's
/// `get_start_time_from_progress_log`).
fn start_of_world_size(text: &str, world_size: usize) -> Option<(NaiveDateTime, f64)> {
    fn field<'a>(token: Option<&&'a str>) -> Option<&'a str> {
        token.and_then(|t| t.split(": ").nth(1)).map(str::trim)
    }
    let (mut start, mut latest_flops) = (None, 0.0);
    for line in text.lines() {
        let tokens: Vec<&str> = line.trim().split('\t').collect();
        let Some(world) = field(tokens.get(2)).and_then(|w| w.parse::<usize>().ok()) else {
            continue;
        };
        if tokens.get(3) == Some(&"Saved checkpoint") {
            if let Some(f) = field(tokens.get(7)).and_then(|f| f.parse().ok()) {
                latest_flops = f;
            }
        }
        if world != world_size {
            start = None;
            continue;
        }
        if tokens.get(3) == Some(&"Starting job") && start.is_none() {
            let time = NaiveDateTime::parse_from_str(tokens[0], TIMESTAMP_FORMAT).ok()?;
            start = Some((time, latest_flops));
        }
    }
    start
}

/// Python's `f"{x:.2e}"`: `3.15e+18`.
fn exp2(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    super::log::python_exponent(&format!("{x:.2e}"), 'e')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_does() {
        assert_eq!(exp2(3.0e12), "3.00e+12");
        assert_eq!(exp2(0.0), "0.00e+00");
        assert_eq!(exp2(1.234e-5), "1.23e-05");
        assert_eq!(exp2(f64::INFINITY), "inf");
    }

    /// The start is the first `Starting job` after the last change of world size, with the
    /// operations of the save before it.
    #[test]
    fn the_start_is_the_first_job_of_the_current_world_size() {
        let text = "\
2026-01-01 10:00:00\tJob ID: 1\t# GPUs: 4\tStarting job
2026-01-01 11:00:00\tJob ID: 1\t# GPUs: 4\tSaved checkpoint\tIteration: 10\tJob throughput: 1.0 TFLOP/s/GPU\tCumulative throughput: 1.0 TFLOP/s/GPU\tFloating-point operations: 1.00e+15\tTokens (in billions): 0.01
2026-01-01 12:00:00\tJob ID: 2\t# GPUs: 8\tStarting job
2026-01-01 12:30:00\tJob ID: 2\t# GPUs: 8\tSaved checkpoint\tIteration: 20\tJob throughput: 1.0 TFLOP/s/GPU\tCumulative throughput: 1.0 TFLOP/s/GPU\tFloating-point operations: 2.00e+15\tTokens (in billions): 0.02
2026-01-01 13:00:00\tJob ID: 3\t# GPUs: 8\tStarting job
";
        let (t, flops) = start_of_world_size(text, 8).unwrap();
        assert_eq!(t.format(TIMESTAMP_FORMAT).to_string(), "2026-01-01 12:00:00");
        assert_eq!(flops, 1.0e15);
        // World size 8 came after 4's jobs: their start no longer counts.
        assert!(start_of_world_size(text, 4).is_none());
        assert!(start_of_world_size(text, 2).is_none());
    }
}
