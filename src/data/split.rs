//! Split strings ("969,30,1") and split matrices, as megatron-core's `utils.py`.
use anyhow::{bail, ensure, Result};

/// The three dataset splits, in Megatron's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training split.
    Train = 0,
    /// Validation split.
    Valid = 1,
    /// Test split.
    Test = 2,
}

impl Split {
    /// All splits in order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    /// Megatron's lowercase name (`train|valid|test`), used in cache file names.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// numpy's float64 `sum` (pairwise summation: plain loop below 8 elements, 8 accumulators up
/// to 128, recursive halving beyond) so normalized weights match NumPy to the last bit.
pub fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        return a.iter().fold(0.0, |s, x| s + x);
    }
    if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i + 8 <= n {
            for k in 0..8 {
                r[k] += a[i + k];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for x in &a[i..] {
            res += x;
        }
        return res;
    }
    let mut n2 = n / 2;
    n2 -= n2 % 8;
    numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
}

/// `normalize(weights)`: each weight divided by the float64 sum.
pub fn normalize(w: &[f64]) -> Result<Vec<f64>> {
    let s = numpy_sum(w);
    ensure!(s > 0.0 && s.is_finite(), "weights {w:?} must have a positive finite sum");
    Ok(w.iter().map(|x| x / s).collect())
}

/// `parse_and_normalize_split`: every `[.0-9]+` run is a weight; right-padded to 3.
pub fn parse_split(s: &str) -> Result<[f64; 3]> {
    let mut vals = Vec::new();
    let mut cur = String::new();
    for ch in s.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_digit() || ch == '.' {
            cur.push(ch);
        } else if !cur.is_empty() {
            let v: f64 = cur.parse().map_err(|_| {
                anyhow::anyhow!(
                    "bad split {s:?}: {cur:?} is not a number (expected e.g. \"969,30,1\")"
                )
            })?;
            vals.push(v);
            cur.clear();
        }
    }
    if s.contains('-') {
        bail!("bad split {s:?}: weights must be non-negative");
    }
    ensure!(!vals.is_empty(), "bad split {s:?}: no weights found (expected e.g. \"969,30,1\")");
    ensure!(
        vals.len() <= 3,
        "bad split {s:?}: {} weights, at most 3 (train,valid,test)",
        vals.len()
    );
    vals.resize(3, 0.0);
    let n =
        normalize(&vals).map_err(|_| anyhow::anyhow!("bad split {s:?}: weights sum to zero"))?;
    Ok([n[0], n[1], n[2]])
}

/// `convert_split_vector_to_split_matrix(v)`: cumulative bookends; an empty range is None.
pub fn split_matrix(v: &[f64; 3]) -> [Option<(f64, f64)>; 3] {
    let mut e = [0.0f64; 4];
    for i in 0..3 {
        e[i + 1] = e[i] + v[i];
    }
    std::array::from_fn(|i| if e[i + 1] <= e[i] { None } else { Some((e[i], e[i + 1])) })
}

/// Sequence ids `[round(a·N), round(b·N))` (Python banker's rounding) of one split.
pub fn split_range(bookend: (f64, f64), n: usize) -> std::ops::Range<usize> {
    let beg = (bookend.0 * n as f64).round_ties_even() as usize;
    let end = (bookend.1 * n as f64).round_ties_even() as usize;
    beg..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_split() {
        let v = parse_split("969,30,1").unwrap();
        assert_eq!(v, [0.969, 0.03, 0.001]);
        assert_eq!(parse_split("969 30 1").unwrap(), v);
        assert_eq!(parse_split("969/30/1").unwrap(), v);
        assert_eq!(parse_split("99,1").unwrap(), [0.99, 0.01, 0.0]);
        let m = split_matrix(&v);
        assert_eq!(m[0], Some((0.0, 0.969)));
        assert_eq!(split_range(m[0].unwrap(), 1000), 0..969);
        assert_eq!(split_range(m[1].unwrap(), 1000), 969..999);
        assert_eq!(split_range(m[2].unwrap(), 1000), 999..1000);
        assert_eq!(split_matrix(&parse_split("1,0,0").unwrap())[1], None);
        assert!(parse_split("1,2,3,4").is_err());
        assert!(parse_split("0,0").is_err());
        assert!(parse_split("abc").is_err());
        assert!(parse_split("1..2,3").is_err());
    }
}
