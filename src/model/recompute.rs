//! Activation recompute as Megatron's `recompute_granularity = "full"` with
//! `recompute_method` uniform/block and `recompute_num_layers`.
//!
//! candle has no checkpoint primitive, so a checkpointed segment of layers is one CustomOp on
//! its input: the forward runs the layers on a detached copy of the input and keeps only the
//! output (every intermediate activation is freed at once); the backward runs the same layers
//! again with a graph on the saved input, backpropagates the output gradient through them and
//! returns the input gradient. The layers' parameter gradients cannot leave a CustomOp's
//! backward, so they go to a [`RecomputeGrads`] sink that the training step adds to its
//! gradients after `backward()` (the outer graph never sees those parameters, so nothing is
//! counted twice).

use crate::config::model::{ModelConfig, RecomputeGranularity, RecomputeMethod};
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, Var};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Which layers of a stage are recomputed, in checkpointed segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecomputePlan {
    pub method: RecomputeMethod,
    pub num_layers: usize,
}

impl RecomputePlan {
    /// The plan of `cfg`, or None without full recompute. `selective` (core attention only)
    /// is not implemented yet and is rejected rather than silently ignored.
    pub fn from_config(cfg: &ModelConfig) -> Result<Option<Self>> {
        match cfg.recompute_granularity {
            None => Ok(None),
            Some(RecomputeGranularity::Selective) => bail!(
                "model.recompute_granularity = \"selective\" is not supported yet; use \"full\" (with recompute_method and recompute_num_layers) or leave it unset"
            ),
            Some(RecomputeGranularity::Full) => {
                let Some(method) = cfg.recompute_method else {
                    bail!("model.recompute_granularity = \"full\" needs model.recompute_method (uniform or block)")
                };
                let num_layers = cfg.recompute_num_layers.unwrap_or(1);
                if num_layers == 0 {
                    bail!("model.recompute_num_layers must be at least 1 with full recompute");
                }
                Ok(Some(Self { method, num_layers }))
            }
        }
    }

    /// Splits a stage's `n` layers into consecutive segments, `true` = checkpointed.
    /// Uniform: segments of `num_layers` layers, each checkpointed (the last may be shorter).
    /// Block: the first `num_layers` layers checkpointed one by one, the rest run normally.
    pub fn segments(&self, n: usize) -> Vec<(Range<usize>, bool)> {
        match self.method {
            RecomputeMethod::Uniform => (0..n)
                .step_by(self.num_layers)
                .map(|s| (s..(s + self.num_layers).min(n), true))
                .collect(),
            RecomputeMethod::Block => {
                let k = self.num_layers.min(n);
                let mut v: Vec<_> = (0..k).map(|i| (i..i + 1, true)).collect();
                if k < n {
                    v.push((k..n, false));
                }
                v
            }
        }
    }
}

/// Parameter gradients produced by recomputed segments during one backward pass.
#[derive(Debug, Clone, Default)]
pub struct RecomputeGrads(Arc<Mutex<Vec<GradStore>>>);

impl RecomputeGrads {
    /// Takes the stores collected so far (one per checkpointed segment).
    pub fn take(&self) -> Vec<GradStore> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, g: GradStore) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(g);
    }
}

/// A segment's forward function: hidden states in, hidden states out (same shape).
pub type SegmentFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// Runs `f` on `x` without keeping its activations; see the module docs.
pub fn checkpoint(x: &Tensor, f: SegmentFn, grads: &RecomputeGrads) -> candle_core::Result<Tensor> {
    // Contiguous and at offset 0, so the forward can hand over its storage as is.
    let y = f(&x.detach())?.detach().copy()?;
    if y.dims() != x.dims() {
        candle_core::bail!(
            "checkpointed segment changed the shape {:?} to {:?}",
            x.dims(),
            y.dims()
        );
    }
    x.apply_op1(Checkpoint { f, grads: grads.clone(), value: Mutex::new(Some(y)) })
}

struct Checkpoint {
    f: SegmentFn,
    grads: RecomputeGrads,
    /// The segment's output, computed before the op is applied; moved out by the forward.
    value: Mutex<Option<Tensor>>,
}

impl Checkpoint {
    fn take_value(&self) -> candle_core::Result<Storage> {
        let v = self.value.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(v) = v else { candle_core::bail!("checkpoint forward ran twice") };
        let (s, l) = v.storage_and_layout();
        s.try_clone(l)
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "recompute-checkpoint"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take_value()? {
            Storage::Cpu(c) => Ok((c, l.shape().clone())),
            _ => candle_core::bail!("checkpoint: segment output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.take_value()? {
            Storage::Cuda(c) => Ok((c, l.shape().clone())),
            _ => candle_core::bail!("checkpoint: segment output is not on the GPU"),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.f)(xv.as_tensor())?;
        // backward() seeds with ones, so d(y·grad)/dy = grad exactly: no sum needed.
        let mut store = y.mul(&grad.detach())?.backward()?;
        let dx = store.remove(xv.as_tensor());
        self.grads.push(store);
        Ok(dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(method: RecomputeMethod, num_layers: usize) -> RecomputePlan {
        RecomputePlan { method, num_layers }
    }

    #[test]
    fn uniform_and_block_segments_follow_megatron() {
        let u = plan(RecomputeMethod::Uniform, 2).segments(5);
        assert_eq!(u, vec![(0..2, true), (2..4, true), (4..5, true)]);
        let b = plan(RecomputeMethod::Block, 2).segments(5);
        assert_eq!(b, vec![(0..1, true), (1..2, true), (2..5, false)]);
        let all = plan(RecomputeMethod::Block, 9).segments(3);
        assert_eq!(all, vec![(0..1, true), (1..2, true), (2..3, true)]);
    }

    #[test]
    fn checkpoint_gives_the_same_gradients() {
        let dev = candle_core::Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap()).unwrap();
        let x0 =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [-3.0, 0.5]], &dev).unwrap()).unwrap();
        let wt = w.as_tensor().clone();
        let f: SegmentFn = Arc::new(move |x: &Tensor| x.matmul(&wt)?.tanh()?.add(x));
        let plain =
            f(x0.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let sink = RecomputeGrads::default();
        let y = checkpoint(x0.as_tensor(), f.clone(), &sink).unwrap();
        let outer = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            outer.get(w.as_tensor()).is_none(),
            "the outer graph must not see the segment's parameters"
        );
        let stores = sink.take();
        assert_eq!(stores.len(), 1);
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "difference {d}");
        };
        close(stores[0].get(w.as_tensor()).unwrap(), plain.get(w.as_tensor()).unwrap());
        close(outer.get(x0.as_tensor()).unwrap(), plain.get(x0.as_tensor()).unwrap());
    }
}
