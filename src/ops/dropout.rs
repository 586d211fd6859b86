//! Seeded dropout, reproducible on CPU.
//!
//! candle's CPU random generator cannot be seeded (`Device::set_seed` fails on CPU), so masks
//! are drawn on the host from a ChaCha8 stream keyed by `(seed, iteration, microbatch)`: the
//! same run replays the same masks bit for bit, which the "same seed ⇒ same loss curve"
//! promise needs. Masks are `keep / (1 - p)` (inverted dropout, as torch).

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

/// Source of dropout masks for one forward pass (training mode). Pass none for evaluation.
#[derive(Debug)]
pub struct DropoutRng {
    rng: RefCell<ChaCha8Rng>,
}

/// splitmix64 finalizer: spreads nearby (seed, iteration, microbatch) triples apart.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DropoutRng {
    /// The mask stream of micro-batch `microbatch` of training iteration `iteration`.
    pub fn new(seed: u64, iteration: u64, microbatch: u64) -> Self {
        let key = mix(mix(mix(seed) ^ iteration) ^ microbatch);
        Self { rng: RefCell::new(ChaCha8Rng::seed_from_u64(key)) }
    }

    /// Applies dropout with drop probability `p` to `x` (identity for `p == 0`).
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        self.dropout_shard(x, p, 0, 0, 1)
    }

    /// Dropout of a tensor-parallel shard: `x` is part `rank` of `size` equal parts along
    /// `dim` of a global tensor. The mask of the whole global tensor is drawn (so the stream
    /// advances as with TP=1) and this rank's part is applied: TP=n and TP=1 drop the same
    /// elements.
    pub fn dropout_shard(
        &self,
        x: &Tensor,
        p: f64,
        dim: usize,
        rank: usize,
        size: usize,
    ) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        if p >= 1.0 {
            return x.zeros_like();
        }
        let keep_scale = (1.0 / (1.0 - p)) as f32;
        let p = p as f32;
        let mut rng = self.rng.borrow_mut();
        let mut global = x.dims().to_vec();
        if rank >= size || dim >= global.len() {
            candle_core::bail!("dropout shard {rank}/{size} along dim {dim} of {:?}", x.dims());
        }
        let local = global[dim];
        global[dim] *= size;
        let n: usize = global.iter().product();
        let mask: Vec<f32> =
            (0..n).map(|_| if rng.random::<f32>() >= p { keep_scale } else { 0.0 }).collect();
        let mut mask = Tensor::from_vec(mask, global, x.device())?;
        if size > 1 {
            mask = mask.narrow(dim, rank * local, local)?;
        }
        x.mul(&mask.to_dtype(x.dtype())?)
    }
}
