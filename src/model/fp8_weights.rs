//! The FP8 weights of a model's linear layers, quantized once per optimizer step.
//!
//! Within one step the weights do not change, yet every micro-batch's forward (and every
//! recomputed forward) quantizes them again: an amax pass and a cast pass over each FP8
//! layer's weight. Transformer Engine avoids that with `is_first_microbatch`: the first
//! micro-batch quantizes and caches, the others reuse. Here the trainer holds the cache for
//! the forward-backward passes of a step ([`Fp8WeightCache::hold`]); the hold ends before the
//! optimizer changes the weights, so a quantized weight can never outlive its values.
//! Outside a hold (evaluation, generation, a step of one micro-batch without recompute,
//! where nothing would be reused) each GEMM quantizes its weight itself; a forward without a
//! backward quantizes only the orientation its GEMM reads. An FP8 primary weight
//! ([`super::fp8_params`]) is read as stored; only its transposed copy is written and held.

use super::fp8_params;
use crate::ops::fp8::{Fp8Recipe, Fp8Weight};
use candle_core::{Result, Tensor, TensorId};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The FP8 setting of a block's linear layers: the recipe and the model's weight cache.
#[derive(Clone, Debug)]
pub struct Fp8Linears {
    pub recipe: Fp8Recipe,
    pub weights: Fp8WeightCache,
}

/// Quantized weights by parameter, while a [`Fp8WeightHold`] is alive. Clones share one cache.
#[derive(Clone, Default)]
pub struct Fp8WeightCache(Arc<Mutex<Option<HashMap<TensorId, Fp8Weight>>>>);

impl std::fmt::Debug for Fp8WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.lock().as_ref().map(HashMap::len);
        f.debug_struct("Fp8WeightCache").field("held_weights", &held).finish()
    }
}

impl Fp8WeightCache {
    fn lock(&self) -> MutexGuard<'_, Option<HashMap<TensorId, Fp8Weight>>> {
        // A panic elsewhere cannot leave the map half-written: insert is its only change.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The parameter `w` quantized for its GEMMs: the held copy if there is one, else a
    /// fresh one (kept while the cache is held). Keyed by the parameter's id, so pass the
    /// parameter itself, not a detached view of it.
    pub fn weight(&self, w: &Tensor, recipe: &Fp8Recipe) -> Result<Fp8Weight> {
        let mut cache = self.lock();
        let quantize = || match fp8_params::is_stored(w) {
            true => fp8_params::weight(w, true),
            false => Fp8Weight::quantize(&w.detach(), recipe),
        };
        match cache.as_mut() {
            None => quantize(),
            Some(held) => match held.entry(w.id()) {
                Entry::Occupied(e) => Ok(e.get().clone()),
                Entry::Vacant(e) => Ok(e.insert(quantize()?).clone()),
            },
        }
    }

    /// The parameter `w` quantized for a forward GEMM without a backward (evaluation): the
    /// held copy if there is one, else a fresh one for the forward alone, which is not kept
    /// (a backward in the same hold needs both orientations).
    pub fn weight_for_forward(&self, w: &Tensor, recipe: &Fp8Recipe) -> Result<Fp8Weight> {
        let held = self.lock().as_ref().and_then(|held| held.get(&w.id()).cloned());
        match held {
            Some(q) => Ok(q),
            None if fp8_params::is_stored(w) => fp8_params::weight(w, false),
            None => Fp8Weight::quantize_for_forward(&w.detach(), recipe),
        }
    }

    /// Keeps quantized weights until the returned hold is dropped; the weights must not
    /// change meanwhile. A hold taken while another is alive changes nothing.
    pub fn hold(&self) -> Fp8WeightHold {
        let mut cache = self.lock();
        let owner = cache.is_none();
        if owner {
            *cache = Some(HashMap::new());
        }
        Fp8WeightHold { cache: self.clone(), owner }
    }

    /// How many quantized weights are held (0 without a hold).
    pub fn held(&self) -> usize {
        self.lock().as_ref().map_or(0, HashMap::len)
    }
}

/// Keeps a model's quantized FP8 weights for reuse; dropping it frees them.
#[must_use = "the cache is emptied when the hold is dropped"]
pub struct Fp8WeightHold {
    cache: Fp8WeightCache,
    owner: bool,
}

impl Drop for Fp8WeightHold {
    fn drop(&mut self) {
        if self.owner {
            *self.cache.lock() = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_hold_reuses_one_quantization_and_its_end_forgets_it() {
        let recipe = Fp8Recipe::from_name("hybrid", true).unwrap();
        let w = Var::randn(0f32, 0.05, (16, 32), &Device::Cpu).unwrap();
        let cache = Fp8WeightCache::default();
        // Without a hold every call quantizes anew and nothing is kept.
        let q = cache.weight(&w, &recipe).unwrap();
        assert!(!q.is_shared());
        assert_eq!(cache.held(), 0);
        {
            let _hold = cache.hold();
            let a = cache.weight(&w, &recipe).unwrap();
            let b = cache.weight(&w, &recipe).unwrap();
            assert!(a.is_shared() && b.is_shared());
            assert_eq!(cache.held(), 1);
            // A forward without a backward reuses the held copy but adds none of its own.
            assert!(cache.weight_for_forward(&w, &recipe).unwrap().is_shared());
            let other = Var::randn(0f32, 0.05, (16, 32), &Device::Cpu).unwrap();
            assert!(!cache.weight_for_forward(&other, &recipe).unwrap().is_shared());
            assert_eq!(cache.held(), 1);
            // A nested hold neither empties the cache nor ends the outer one.
            drop(cache.hold());
            assert_eq!(cache.held(), 1);
        }
        assert_eq!(cache.held(), 0);
        // The optimizer changes the weight between holds: the next hold quantizes it anew.
        let before = cache.weight(&w, &recipe).unwrap();
        // Doubled: the same FP8 values with twice the scale, so the product doubles exactly.
        w.set(&(w.as_tensor() * 2.0).unwrap()).unwrap();
        let _hold = cache.hold();
        let after = cache.weight(&w, &recipe).unwrap();
        let x = Tensor::randn(0f32, 1.0, (8, 32), &Device::Cpu).unwrap();
        let y = |q: Fp8Weight| crate::ops::fp8::linear_saving(&x, q, None, &recipe, false, None);
        let (y_before, _) = y(before).unwrap();
        let (y_after, _) = y(after).unwrap();
        let diff = (y_after - (y_before * 2.0).unwrap()).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
