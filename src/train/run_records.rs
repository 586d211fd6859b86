//! Records of a run beside its metrics: the config copy Megatron Bridge writes at start-up
//! (`logger.save_config_filepath`) and its run-time estimate for TensorBoard
//! (`logger.log_runtime_to_tensorboard`).

use std::path::Path;

use crate::config::logger::RUNTIME_TIME_UNITS;
use crate::config::ConfigContainer;

/// Writes the run's config to `path` (rank 0, once), as Megatron Bridge's `cfg.to_yaml(path)`:
/// a `.toml` path gets `run_config_toml` (the config as mbridge loads it again), any other the
/// resolved config as JSON, which YAML loaders read as well (JSON is YAML 1.2). As in
/// Megatron Bridge a failure is printed and the run goes on.
pub fn save_config_copy(cfg: &ConfigContainer, run_config_toml: &str, path: &Path) {
    let toml = path.extension().is_some_and(|e| e == "toml");
    let write = || -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text =
            if toml { run_config_toml.to_string() } else { serde_json::to_string_pretty(cfg)? };
        std::fs::write(path, text)?;
        Ok(())
    };
    if let Err(e) = write() {
        println!("Error saving config to file {}: {e:#}", path.display());
    }
}

/// What the run has done and how long the rest should take, Megatron Bridge's
/// `report_runtime`: `(tag, value)` pairs with times in `unit` (a [`RUNTIME_TIME_UNITS`] name). The
/// estimate extrapolates this job's elapsed time over the iterations it has covered.
pub fn runtime_report(
    step: u64,
    train_iters: u64,
    consumed_samples: u64,
    seq_length: usize,
    elapsed_seconds: f64,
    unit: &str,
) -> Vec<(&'static str, f64)> {
    let divider = RUNTIME_TIME_UNITS.iter().find(|(n, _)| *n == unit).map_or(3600.0, |(_, s)| *s);
    let done = step as f64 / train_iters.max(1) as f64;
    let remaining = if done > 0.0 { elapsed_seconds / done * (1.0 - done) } else { f64::INFINITY };
    vec![
        ("time/remaining_estimate", remaining / divider),
        ("time/tokens", (consumed_samples * seq_length as u64) as f64),
        ("time/samples", consumed_samples as f64),
        ("time/batches", step as f64),
        ("time/total", elapsed_seconds / divider),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_report_extrapolates_the_elapsed_time() {
        // A quarter of 100 iterations in 30 minutes: 90 minutes to go.
        let r = runtime_report(25, 100, 200, 1024, 1800.0, "minutes");
        let get = |k: &str| r.iter().find(|(t, _)| *t == k).unwrap().1;
        assert_eq!(get("time/remaining_estimate"), 90.0);
        assert_eq!(get("time/total"), 30.0);
        assert_eq!(
            (get("time/tokens"), get("time/samples"), get("time/batches")),
            (204800.0, 200.0, 25.0)
        );
        let hours = runtime_report(25, 100, 200, 1024, 1800.0, "hours");
        assert_eq!(hours[0].1, 1.5);
    }

    #[test]
    fn the_config_copy_is_toml_or_json_and_a_failure_only_prints() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ConfigContainer::default();
        let toml_path = dir.path().join("a/run.toml");
        save_config_copy(&cfg, "[train]\ntrain_iters = 3\n", &toml_path);
        assert_eq!(std::fs::read_to_string(&toml_path).unwrap(), "[train]\ntrain_iters = 3\n");
        let yaml = dir.path().join("run.yaml");
        save_config_copy(&cfg, "", &yaml);
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&yaml).unwrap()).unwrap();
        assert_eq!(back["logger"]["log_interval"], 100);
        // A directory in the way: reported, nothing panics.
        save_config_copy(&cfg, "", dir.path());
    }
}
