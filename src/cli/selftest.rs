//! `mbridge selftest cuda`: numerical checks and micro-benchmarks of the fused CUDA kernels on
//! the GPU this process sees. Each kernel family registers one [`Check`] below; its code lives
//! next to the kernel (e.g. `ops::cuda::flash_attn::selftest`). Exits nonzero when any check
//! fails, so the device scripts can gate on it.

use anyhow::{bail, Result};

/// Arguments of `mbridge selftest`.
#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// What to test (only `cuda` so far).
    #[arg(value_enum)]
    pub target: Target,
    /// Run only checks whose name contains this string.
    #[arg(long)]
    pub filter: Option<String>,
    /// Skip the micro-benchmarks.
    #[arg(long)]
    pub no_bench: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

/// Test targets.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Target {
    /// The fused CUDA kernels (needs a build with the `cuda` feature and a GPU).
    Cuda,
}

/// One registered check: `run(device, bench)` prints its results and returns whether all passed.
pub struct Check {
    pub name: &'static str,
    pub run: fn(&candle_core::Device, bool) -> Result<bool>,
}

/// The CUDA checks, in run order.
#[cfg(feature = "cuda")]
pub const CUDA_CHECKS: &[Check] = &[
    Check { name: "flash_attn", run: crate::ops::cuda::flash_attn::selftest::run },
    Check {
        name: "flash_attn_model",
        run: |dev, _| crate::ops::cuda::flash_attn::selftest::run_model(dev),
    },
];

/// Names of the checks `filter` selects from `checks`.
pub fn select<'a>(checks: &'a [Check], filter: Option<&str>) -> Vec<&'a Check> {
    checks.iter().filter(|c| filter.is_none_or(|f| c.name.contains(f))).collect()
}

/// Runs the selected checks; an error when any failed or none matched.
pub fn run(args: SelftestArgs) -> Result<()> {
    match args.target {
        Target::Cuda => run_cuda(&args),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &SelftestArgs) -> Result<()> {
    let dev = candle_core::Device::new_cuda(args.device)?;
    let checks = select(CUDA_CHECKS, args.filter.as_deref());
    if checks.is_empty() {
        bail!("no CUDA check matches {:?}", args.filter);
    }
    let mut failed = Vec::new();
    for c in checks {
        println!("== {}", c.name);
        match (c.run)(&dev, !args.no_bench) {
            Ok(true) => {}
            Ok(false) => failed.push(c.name),
            Err(e) => {
                println!("{}: ERROR {e:#}", c.name);
                failed.push(c.name);
            }
        }
    }
    if failed.is_empty() {
        println!("selftest cuda: all checks passed");
        Ok(())
    } else {
        bail!("selftest cuda: failed: {}", failed.join(", "))
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &SelftestArgs) -> Result<()> {
    bail!("this mbridge was built without the `cuda` feature (build with scripts/device/build.sh)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &candle_core::Device, _: bool) -> Result<bool> {
        Ok(true)
    }

    #[test]
    fn filter_selects_by_substring() {
        let checks = [Check { name: "flash_attn", run: ok }, Check { name: "rms_norm", run: ok }];
        assert_eq!(select(&checks, None).len(), 2);
        let names: Vec<_> = select(&checks, Some("norm")).iter().map(|c| c.name).collect();
        assert_eq!(names, ["rms_norm"]);
        assert!(select(&checks, Some("nope")).is_empty());
    }
}
