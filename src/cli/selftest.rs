//! `mbridge selftest cuda`: every fused CUDA op's forward and backward against the composite
//! f32 reference on the CPU, on random inputs; prints each comparison's error and exits
//! nonzero if any exceeds its tolerance.
//!
//! Checks live in a registry ([`cuda_checks`]): a name and either a function returning
//! [`Measure`]s (judged and printed here) or one that prints its own comparisons and
//! micro-benchmarks (flash attention, `ops::cuda::flash_attn::selftest`).

#[cfg(feature = "cuda")]
mod explicit;
#[cfg(feature = "cuda")]
mod fused;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// What to test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The fused CUDA kernels (needs a GPU and a `cuda` build).
    Cuda,
}

/// Arguments of `mbridge selftest`.
#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// What to check.
    pub target: Target,
    /// The GPU to run on.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Run only checks whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Skip the micro-benchmarks.
    #[arg(long)]
    pub no_bench: bool,
}

/// One comparison: the maximum absolute error of `got` against `want`, relative to the
/// largest magnitude in `want` (so one tolerance serves tensors of any scale).
#[derive(Debug, Clone, PartialEq)]
pub struct Measure {
    pub what: String,
    pub max_abs_err: f64,
    pub ref_max_abs: f64,
    pub tol: f64,
}

impl Measure {
    /// Error relative to the reference's largest magnitude.
    pub fn rel_err(&self) -> f64 {
        self.max_abs_err / self.ref_max_abs.max(1e-30)
    }

    /// Within tolerance (NaN fails).
    pub fn pass(&self) -> bool {
        self.rel_err() <= self.tol
    }

    /// A failed measure that is not a numeric comparison (e.g. a missing gradient).
    pub fn failed(what: impl Into<String>) -> Self {
        Self { what: what.into(), max_abs_err: f64::NAN, ref_max_abs: 1.0, tol: 0.0 }
    }
}

/// Compares `got` with `want` (any devices/dtypes, same shape) as [`Measure`] `what`.
pub fn compare(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<Measure> {
    if got.dims() != want.dims() {
        bail!("{what}: shape {:?} vs reference {:?}", got.dims(), want.dims());
    }
    let cpu = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    let (g, w) = (cpu(got)?, cpu(want)?);
    let mut max_err = 0f64;
    for (a, b) in g.iter().zip(&w) {
        let e = (a - b).abs();
        // NaN must not hide behind f64::max.
        max_err = if e.is_nan() || max_err.is_nan() { f64::NAN } else { max_err.max(e) };
    }
    let ref_max = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    Ok(Measure { what: what.to_string(), max_abs_err: max_err, ref_max_abs: ref_max, tol })
}

/// How a check reports.
#[derive(Clone, Copy)]
pub enum CheckFn {
    /// Returns comparisons (`device`, `seed`); the runner prints and judges them.
    Measures(fn(&Device, u64) -> Result<Vec<Measure>>),
    /// Prints its own comparisons, benchmarks unless told not to (`device`, `bench`), and
    /// returns whether all passed.
    Reporting(fn(&Device, bool) -> Result<bool>),
}

/// A named group of comparisons.
pub struct Check {
    pub name: &'static str,
    pub run: CheckFn,
}

/// The CUDA checks, in the order they run.
pub fn cuda_checks() -> Vec<Check> {
    #[cfg(feature = "cuda")]
    {
        use crate::ops::cuda::flash_attn::selftest as flash;
        let mut checks = fused::checks();
        checks.extend(explicit::checks());
        checks.push(Check { name: "flash_attn", run: CheckFn::Reporting(flash::run) });
        checks.push(Check {
            name: "flash_attn_model",
            run: CheckFn::Reporting(|dev, _| flash::run_model(dev)),
        });
        checks.push(Check {
            name: "flash_attn_packed_model",
            run: CheckFn::Reporting(|dev, _| flash::run_packed_model(dev)),
        });
        checks
    }
    #[cfg(not(feature = "cuda"))]
    {
        Vec::new()
    }
}

/// Runs `checks` on `device`, prints one line per measure; errors if any fails or errors.
pub fn run_checks(checks: &[Check], device: &Device, seed: u64, bench: bool) -> Result<()> {
    let (mut failed, mut total) = (Vec::new(), 0usize);
    for c in checks {
        let measures = match c.run {
            CheckFn::Measures(f) => f(device, seed),
            CheckFn::Reporting(f) => {
                println!("== {}", c.name);
                total += 1;
                match f(device, bench) {
                    Ok(true) => {}
                    Ok(false) => failed.push(c.name.to_string()),
                    Err(e) => {
                        println!("FAIL {:<14} error: {e:#}", c.name);
                        failed.push(format!("{}: {e}", c.name));
                    }
                }
                continue;
            }
        };
        match measures {
            Ok(measures) => {
                for m in measures {
                    total += 1;
                    let verdict = if m.pass() { "PASS" } else { "FAIL" };
                    println!(
                        "{verdict} {:<14} {:<34} max|err| {:.3e}  rel {:.3e}  tol {:.1e}",
                        c.name,
                        m.what,
                        m.max_abs_err,
                        m.rel_err(),
                        m.tol
                    );
                    if !m.pass() {
                        failed.push(format!("{}: {}", c.name, m.what));
                    }
                }
            }
            Err(e) => {
                total += 1;
                println!("FAIL {:<14} error: {e:#}", c.name);
                failed.push(format!("{}: {e}", c.name));
            }
        }
    }
    if failed.is_empty() {
        println!("selftest: all {total} comparisons passed");
        Ok(())
    } else {
        bail!("selftest: {} of {total} comparisons failed: {}", failed.len(), failed.join("; "))
    }
}

/// `mbridge selftest cuda`.
pub fn run(args: SelftestArgs) -> Result<()> {
    match args.target {
        Target::Cuda => {
            if !cfg!(feature = "cuda") {
                bail!("selftest cuda: this mbridge was built without CUDA (build with --features cuda, e.g. scripts/device/build.sh)");
            }
            let device = super::pretrain::parse_device(&args.device)?;
            if !device.is_cuda() {
                bail!("selftest cuda: --device must be cuda:N, got {}", args.device);
            }
            let checks: Vec<Check> = cuda_checks()
                .into_iter()
                .filter(|c| args.filter.as_deref().is_none_or(|f| c.name.contains(f)))
                .collect();
            if checks.is_empty() {
                bail!("selftest cuda: no check matches the filter");
            }
            run_checks(&checks, &device, args.seed, !args.no_bench)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn compare_measures_relative_error() {
        let m = compare("x", &t(&[1.0, 2.0, 4.01]), &t(&[1.0, 2.0, 4.0]), 1e-2).unwrap();
        assert!((m.max_abs_err - 0.01).abs() < 1e-6);
        assert_eq!(m.ref_max_abs, 4.0);
        assert!(m.pass());
        let bad = compare("x", &t(&[1.0, 2.0, 4.5]), &t(&[1.0, 2.0, 4.0]), 1e-2).unwrap();
        assert!(!bad.pass());
    }

    #[test]
    fn nan_and_missing_values_fail() {
        let m = compare("x", &t(&[f32::NAN, 2.0]), &t(&[1.0, 2.0]), 1.0).unwrap();
        assert!(!m.pass());
        assert!(!Measure::failed("no gradient").pass());
        assert!(compare("x", &t(&[1.0]), &t(&[1.0, 2.0]), 1.0).is_err());
    }

    #[test]
    fn a_failing_check_fails_the_run() {
        let checks = [
            Check {
                name: "ok",
                run: CheckFn::Measures(|_, _| {
                    Ok(vec![Measure {
                        what: "a".into(),
                        max_abs_err: 0.0,
                        ref_max_abs: 1.0,
                        tol: 1e-3,
                    }])
                }),
            },
            Check { name: "bad", run: CheckFn::Measures(|_, _| Ok(vec![Measure::failed("b")])) },
            Check { name: "self", run: CheckFn::Reporting(|_, _| Ok(false)) },
        ];
        assert!(run_checks(&checks[..1], &Device::Cpu, 0, false).is_ok());
        let err = run_checks(&checks[..2], &Device::Cpu, 0, false).unwrap_err().to_string();
        assert!(err.contains("1 of 2") && err.contains("bad: b"), "{err}");
        let err = run_checks(&checks, &Device::Cpu, 0, false).unwrap_err().to_string();
        assert!(err.contains("2 of 3") && err.contains("self"), "{err}");
    }
}
