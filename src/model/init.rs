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
//! stage and TP size — a TP=2 model holds exactly the slices of the TP=1 model.

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
        Init::Normal(std) => {
            let n: usize = shape.iter().product();
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a64(name));
            let dist = Normal::new(0.0f64, std)
                .map_err(|e| candle_core::Error::Msg(format!("init of {name}: {e}")))?;
            let data: Vec<f64> = (0..n).map(|_| dist.sample(&mut rng)).collect();
            Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
        }
    }
}
