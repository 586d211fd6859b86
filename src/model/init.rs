//! Deterministic parameter initialization.
//!
//! Megatron draws each weight from `normal(0, init_method_std)` (output projections
//! `linear_proj`/`linear_fc2` from `normal(0, std / sqrt(2·num_layers))`), biases zero,
//! norm weights one (zero with `layernorm_zero_centered_gamma`). Torch's RNG stream cannot be
//! reproduced bit for bit, so we use our own documented scheme instead:
//!
//! * every parameter has its own ChaCha8 stream (`rand_chacha::ChaCha8Rng`) seeded with
//!   `seed ^ fnv1a64(global parameter name)`, and
//! * the **full, unsharded** tensor is drawn row-major from `rand_distr::Normal<f64>` and then
//!   cast and sliced to this rank's shard.
//!
//! So the same seed gives the same weights bit for bit, independent of creation order, PP
//! stage and TP size — a TP=2 model holds exactly the slices of the TP=1 model. Since each
//! parameter has its own stream, parameters are drawn on all cores at once
//! ([`super::params::ParamStore::finish_init`]): one thread would take about a minute for the
//! 8 billion values of Llama-3-8B.

use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// How a parameter's initial values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// `normal(0, std)`.
    Normal(f64),
    /// All zeros (biases, zero-centered norm weights).
    Zeros,
    /// All ones (norm weights).
    Ones,
}

/// 64-bit FNV-1a hash of a parameter name: stable across platforms and Rust versions
/// (unlike `std::hash`), which the reproducibility promise above needs.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Draws the full (global-shape) initial tensor of parameter `name`.
pub fn init_full(
    name: &str,
    shape: &[usize],
    init: Init,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    match init {
        Init::Zeros => Tensor::zeros(shape, dtype, device),
        Init::Ones => Tensor::ones(shape, dtype, device),
        Init::Normal(std) => draw_normal(name, shape, std, seed, dtype)?.to_device(device),
    }
}

/// The `normal(0, std)` values that parameter `name` starts from (the stream described in
/// the module docs), as a host tensor in `dtype`. Each value is drawn in f64 and rounded to
/// nearest-even into `dtype` as it is drawn, so no f64 copy of the tensor exists; the result
/// is the same as casting the f64 draw (on the GPU, whose casts round correctly). Pure host
/// work, so several parameters can be drawn on several threads at once.
pub fn draw_normal(
    name: &str,
    shape: &[usize],
    std: f64,
    seed: u64,
    dtype: DType,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a64(name));
    let dist = Normal::new(0.0f64, std)
        .map_err(|e| candle_core::Error::Msg(format!("init of {name}: {e}")))?;
    let mut draw = || dist.sample(&mut rng);
    match dtype {
        DType::F64 => {
            Tensor::from_vec((0..n).map(|_| draw()).collect::<Vec<_>>(), shape, &Device::Cpu)
        }
        DType::F32 => {
            Tensor::from_vec((0..n).map(|_| draw() as f32).collect::<Vec<_>>(), shape, &Device::Cpu)
        }
        DType::BF16 => Tensor::from_vec(
            (0..n).map(|_| half::bf16::from_f32(round_to_odd_f32(draw()))).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        ),
        DType::F16 => Tensor::from_vec(
            (0..n).map(|_| half::f16::from_f32(round_to_odd_f32(draw()))).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        ),
        other => candle_core::bail!("init of {name}: cannot draw normal values as {other:?}"),
    }
}

/// `x` rounded to f32 with round-to-odd: truncated toward zero, with the last bit set when
/// anything was cut off. Rounding that to nearest-even at 16 bits (bf16, f16: at least two
/// bits fewer than f32) gives exactly the nearest-even rounding of `x` itself, which rounding
/// through an f32 rounded to nearest would not (double rounding).
fn round_to_odd_f32(x: f64) -> f32 {
    let f = x as f32;
    if f64::from(f) == x || x.is_nan() {
        return f;
    }
    let mut bits = f.to_bits();
    // Same sign as x; one step toward zero where rounding went away from it.
    if f64::from(f).abs() > x.abs() {
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest-even rounding of `x` to bf16 by brute force: the two bf16 neighbours and the
    /// exact f64 distances to them (exact: same binade).
    fn reference_bf16(x: f64) -> half::bf16 {
        let below = {
            let t = half::bf16::from_f32(x as f32);
            // Step down until not above x.
            let mut b = t;
            while f64::from(b.to_f32()) > x {
                b = half::bf16::from_bits(if x >= 0.0 { b.to_bits() - 1 } else { b.to_bits() + 1 });
            }
            while f64::from(half::bf16::from_bits(next_up(b.to_bits(), x)).to_f32()) <= x {
                b = half::bf16::from_bits(next_up(b.to_bits(), x));
            }
            b
        };
        let above = half::bf16::from_bits(next_up(below.to_bits(), x));
        let (lo, hi) = (f64::from(below.to_f32()), f64::from(above.to_f32()));
        let (dlo, dhi) = (x - lo, hi - x);
        if dlo < dhi || (dlo == dhi && below.to_bits() & 1 == 0) {
            below
        } else {
            above
        }
    }

    /// The bf16 bit pattern one step up in value from `bits` (for x's sign).
    fn next_up(bits: u16, x: f64) -> u16 {
        if x >= 0.0 {
            bits + 1
        } else {
            bits - 1
        }
    }

    #[test]
    fn bf16_draws_round_to_nearest_even_from_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let dist = Normal::new(0.0f64, 0.02).unwrap();
        let mut values: Vec<f64> = (0..100_000).map(|_| dist.sample(&mut rng)).collect();
        // Exact midpoints between two bf16 values, and the f64s just beside them: rounding
        // through a nearest f32 gets the latter wrong.
        for m in [0x3c01u16, 0x3c02, 0xbc01, 0x3f80] {
            let lo = f64::from(half::bf16::from_bits(m).to_f32());
            let hi = f64::from(half::bf16::from_bits(m + 1).to_f32());
            let mid = (lo + hi) / 2.0;
            values.extend([mid, mid + mid.abs() * 1e-12, mid - mid.abs() * 1e-12]);
        }
        for x in values {
            let got = half::bf16::from_f32(round_to_odd_f32(x));
            assert_eq!(got.to_bits(), reference_bf16(x).to_bits(), "{x:e}");
        }
        // The composite rounding (through a nearest f32) differs on a near-midpoint.
        // (0x3c02 is even: the tie that the f32 step makes goes down, the value lies above.)
        let lo = f64::from(half::bf16::from_bits(0x3c02).to_f32());
        let hi = f64::from(half::bf16::from_bits(0x3c03).to_f32());
        let x = (lo + hi) / 2.0 + 1e-15;
        assert_ne!(half::bf16::from_f32(x as f32), half::bf16::from_f32(round_to_odd_f32(x)));
    }

    #[test]
    fn f32_draws_are_the_f64_draw_cast() {
        let a = draw_normal("w", &[3, 5], 0.5, 9, DType::F64).unwrap();
        let b = draw_normal("w", &[3, 5], 0.5, 9, DType::F32).unwrap();
        assert_eq!(
            a.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            b.to_vec2::<f32>().unwrap()
        );
        assert!(draw_normal("w", &[2], 0.5, 9, DType::U8).is_err());
    }
}
