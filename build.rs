//! Compiles the project's CUDA kernels (`kernels/*.cu`) to PTX when the `cuda` feature is on.
//!
//! Kernels are built here with nvcc (NVIDIA's compiler wheels, see `scripts/device/build.sh`)
//! rather than with NVRTC at run time, so a kernel that does not compile fails the build on
//! the CPU machine (CI) instead of the first GPU run. The PTX is embedded in the binary with
//! `include_str!` and loaded once per device (`src/ops/cuda/mod.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc_path();
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    // sm_90a unlocks Hopper-only instructions (wgmma, TMA); other caps get plain sm_XX.
    let arch = if cap == "90" { "sm_90a".to_string() } else { format!("sm_{cap}") };
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        compile(&nvcc, &arch, &src, &out_dir);
    }
}

fn nvcc_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        return Path::new(&home).join("bin/nvcc");
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, arch: &str, src: &Path, out_dir: &Path) {
    let stem = src.file_stem().expect("kernel file name").to_string_lossy().to_string();
    let ptx = out_dir.join(format!("{stem}.ptx"));
    let status = Command::new(nvcc)
        .args(["-ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"])
        .arg(format!("-arch={arch}"))
        .arg("-Ikernels")
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nvcc ({}): {e}; build the cuda feature with scripts/device/build.sh",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {}", src.display());
}
