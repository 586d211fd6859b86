//! `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU, bit for bit.
//!
//! Megatron Bridge's shuffling samplers draw their per-epoch order this way. torch's CPU
//! generator is an MT19937 seeded with the standard `init_genrand` (the same state NumPy's
//! legacy `RandomState(seed)` starts from, see [`RandomState`]), and `randperm` for
//! `n < u32::MAX / 20` is a forward Fisher–Yates whose swap partner is `random() % (n - i)`.
//! Larger `n` use another algorithm that is not reproduced here (an error says so).

use anyhow::{ensure, Result};

use crate::data::numpy_rng::RandomState;

/// Below this `n` torch uses the 32-bit Fisher–Yates reproduced here.
const SMALL_N_LIMIT: usize = (u32::MAX / 20) as usize;

/// The permutation of `0..n` that torch's CPU `randperm` draws from `manual_seed(seed)`.
pub fn randperm(n: usize, seed: u64) -> Result<Vec<usize>> {
    ensure!(
        n < SMALL_N_LIMIT,
        "cannot reproduce torch.randperm for {n} samples (≥ {SMALL_N_LIMIT} uses torch's \
         64-bit algorithm, which mbridge does not implement)"
    );
    // at::mt19937(seed) keeps the low 32 bits of the seed.
    let mut rng = RandomState::new(seed as u32);
    let mut r: Vec<usize> = (0..n).collect();
    for i in 0..n.saturating_sub(1) {
        let z = rng.next_u32() as usize % (n - i);
        r.swap(i, z + i);
    }
    Ok(r)
}
