//! Helpers for tests that drive the `mbridge` binary: its training log, the files it wrote,
//! seeded kill times.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::path::Path;

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

/// Every file under `dir` (relative path → bytes; symlinks followed).
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// xorshift64*: a seeded, dependency-free source of kill times.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
