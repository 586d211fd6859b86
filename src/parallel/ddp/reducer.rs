//! Bucketed data-parallel gradient reduction: all-reduce (replicated optimizer) or
//! reduce-scatter (distributed optimizer) of the gradient buffer's buckets.

use candle_core::{Device, Result, Tensor};

use std::sync::Arc;

use super::buckets::{Buffer, BufferLayout};
use super::flights::Collective;
use super::overlap::BackwardOverlap;
use crate::parallel::comm::Communicator;
use crate::train::grads::GradAccumulator;

/// How gradients are scaled around the collective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReduceScaling {
    /// `ddp.average_in_collective`: the collective averages (sum, then ÷ DP) instead of each
    /// rank dividing its gradients by DP before a sum (megatron-core's
    /// `gradient_scaling_factor`).
    pub average_in_collective: bool,
    /// Divide by the DP size at all (false with `calculate_per_token_loss`, where the
    /// gradients are summed and later divided by the global token count).
    pub average: bool,
    /// Extra factor after the reduction (`1 / num_tokens` with per-token loss, else 1).
    pub post: f64,
}

/// Reduces an accumulator's gradients over the data-parallel group, bucket by bucket: one
/// collective after another on the DP group, or (`ddp.overlap_grad_reduce`) on a group of
/// their own, started during backward where possible ([`BackwardOverlap`]).
#[derive(Debug, Clone)]
pub struct GradReducer {
    layout: BufferLayout,
    overlap: Option<Arc<BackwardOverlap>>,
}

impl GradReducer {
    /// Collectives one after the other on the group passed to each reduction.
    pub fn new(layout: BufferLayout) -> Self {
        Self { layout, overlap: None }
    }

    /// Collectives through `overlap` (built on the same layout).
    pub fn overlapped(layout: BufferLayout, overlap: Arc<BackwardOverlap>) -> Self {
        Self { layout, overlap: Some(overlap) }
    }

    pub fn layout(&self) -> &BufferLayout {
        &self.layout
    }

    /// The overlap state the training step feeds (None without overlap).
    pub fn overlap(&self) -> Option<&Arc<BackwardOverlap>> {
        self.overlap.as_ref()
    }

    /// Sums every gradient over `dp` in place (replicated optimizer).
    pub fn all_reduce(
        &self,
        acc: &mut GradAccumulator,
        dp: &dyn Communicator,
        s: ReduceScaling,
    ) -> Result<()> {
        let flats = self.reduce_buckets(acc, dp, s, Collective::AllReduce)?;
        let mut reduced: Vec<Option<Tensor>> = vec![None; acc.iter().count()];
        for (&(b, k), flat) in self.layout.buckets().iter().zip(flats) {
            let buf = &self.layout.buffers[b];
            let bucket = &buf.buckets[k];
            for span in &buf.params[bucket.params.clone()] {
                let g = flat.narrow(0, span.start - bucket.range.start, span.numel)?;
                reduced[span.index] = Some(g.reshape(span.dims.as_slice())?);
            }
        }
        for ((_, slot), g) in acc.iter_mut().zip(reduced) {
            *slot = g;
        }
        Ok(())
    }

    /// Reduce-scatters every bucket over `dp`: this rank's shard of each bucket (in
    /// [`BufferLayout::buckets`] order), summed over ranks and in the master dtype. The
    /// accumulator's gradients are consumed (its slots are empty afterwards).
    pub fn reduce_scatter(
        &self,
        acc: &mut GradAccumulator,
        dp: &dyn Communicator,
        s: ReduceScaling,
    ) -> Result<Vec<Tensor>> {
        self.reduce_buckets(acc, dp, s, Collective::ReduceScatter)
    }

    /// Every bucket's collective result in [`BufferLayout::buckets`] order, in the master
    /// dtype and multiplied by the post factor. The accumulator's gradients are consumed:
    /// each is dropped as soon as its bucket is packed, so a step never holds the
    /// per-parameter gradients and all the reduced buckets at once (for an 8B model's f32
    /// gradients under TP 2, ZeRO-1 over DP 2, about 8 GB).
    fn reduce_buckets(
        &self,
        acc: &mut GradAccumulator,
        dp: &dyn Communicator,
        s: ReduceScaling,
        kind: Collective,
    ) -> Result<Vec<Tensor>> {
        let buckets = self.layout.buckets();
        let (pre, post) = factors(dp.size(), s);
        let flats = match &self.overlap {
            Some(o) => o.finish(acc, kind, pre, dp)?,
            None => {
                let device = acc.iter().next().map_or(Device::Cpu, |(v, _)| v.device().clone());
                let mut grads: Vec<Option<Tensor>> =
                    acc.iter_mut().map(|(_, g)| g.take()).collect();
                let mut flats = Vec::with_capacity(buckets.len());
                for &(b, k) in &buckets {
                    let t = pack(&self.layout.buffers[b], k, &mut grads, &device, pre)?;
                    flats.push(kind.run(dp, &t)?);
                }
                flats
            }
        };
        flats
            .into_iter()
            .zip(&buckets)
            .map(|(t, &(b, _))| finish(t, &self.layout.buffers[b], post))
            .collect()
    }
}

/// (factor before the collective, factor after it).
pub(crate) fn factors(dp: usize, s: ReduceScaling) -> (f64, f64) {
    let inv = if s.average { 1.0 / dp as f64 } else { 1.0 };
    if s.average_in_collective {
        (1.0, inv * s.post)
    } else {
        (inv, s.post)
    }
}

/// The bucket's gradients as one flat tensor in the reduction dtype, zeros in the gaps and
/// for parameters without a gradient, multiplied by `pre`. The bucket's entries of `grads`
/// are taken (its parameters are whole, so no later bucket needs them).
pub(super) fn pack(
    buf: &Buffer,
    k: usize,
    grads: &mut [Option<Tensor>],
    device: &Device,
    pre: f64,
) -> Result<Tensor> {
    let bucket = &buf.buckets[k];
    let acc_dtype = buf.main_grad_dtype();
    let mut parts = Vec::new();
    let mut at = bucket.range.start;
    for span in &buf.params[bucket.params.clone()] {
        if span.start > at {
            parts.push(Tensor::zeros(span.start - at, acc_dtype, device)?);
        }
        parts.push(match grads[span.index].take() {
            Some(g) => g.to_dtype(acc_dtype)?.flatten_all()?,
            None => Tensor::zeros(span.numel, acc_dtype, device)?,
        });
        at = span.start + span.numel;
    }
    if bucket.range.end > at {
        parts.push(Tensor::zeros(bucket.range.end - at, acc_dtype, device)?);
    }
    let mut flat = Tensor::cat(&parts, 0)?;
    if pre != 1.0 {
        flat = flat.affine(pre, 0.0)?;
    }
    flat.to_dtype(buf.reduce_dtype)
}

/// Back to the main-grad dtype, multiplied by `post`.
fn finish(t: Tensor, buf: &Buffer, post: f64) -> Result<Tensor> {
    let t = t.to_dtype(buf.main_grad_dtype())?;
    if post != 1.0 {
        t.affine(post, 0.0)
    } else {
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::comm::LocalWorld;
    use crate::parallel::ddp::LayoutOptions;
    use candle_core::backprop::GradStore;
    use candle_core::{DType, Var};
    use std::time::Duration;

    /// Two in-process ranks with different gradients: every bucket's reduce-scatter shard is
    /// the sum of both ranks' gradients at this rank's offsets (whatever the bucket size and
    /// whether the collectives run on the overlap's communication thread), and the
    /// accumulator is empty afterwards (its gradients were consumed bucket
    /// by bucket, not kept beside the shards).
    #[test]
    fn reduce_scatter_sums_shards_and_consumes_the_gradients() {
        let shapes = [vec![6usize, 5], vec![7], vec![3, 4]];
        let grad = |rank: usize, p: usize, n: usize| -> Vec<f32> {
            (0..n).map(|i| (rank * 1000 + p * 100 + i) as f32).collect()
        };
        for (bucket_size, overlap) in [(None, false), (Some(20), false), (Some(20), true)] {
            let results = LocalWorld::run(2, Duration::from_secs(10), |rank, world| {
                let dp = world.world_group(rank)?;
                let vars: Vec<Var> = shapes
                    .iter()
                    .map(|s| Var::zeros(s.as_slice(), DType::F32, &Device::Cpu))
                    .collect::<Result<_>>()?;
                let layout_shapes: Vec<(Vec<usize>, DType)> =
                    shapes.iter().map(|s| (s.clone(), DType::F32)).collect();
                let opts = LayoutOptions {
                    dp: 2,
                    bucket_size,
                    distributed_optimizer: true,
                    pad_for_high_nccl_busbw: false,
                    grad_reduce_in_fp32: true,
                };
                let layout = BufferLayout::new(&layout_shapes, &opts);
                let mut acc = GradAccumulator::new(vars.clone());
                let mut store = GradStore::default();
                for (p, v) in vars.iter().enumerate() {
                    let n = v.elem_count();
                    store.insert(v, Tensor::from_vec(grad(rank, p, n), v.dims(), &Device::Cpu)?);
                }
                acc.accumulate(&store)?;
                drop(store);
                let reducer = if overlap {
                    let comm = Arc::new(world.group(rank, "dp_cp_grads", &[0, 1])?);
                    let named: Vec<(String, Var)> =
                        vars.iter().map(|v| (String::new(), v.clone())).collect();
                    let o = BackwardOverlap::new(
                        layout.clone(),
                        &named,
                        vec![false; 3],
                        comm,
                        Collective::ReduceScatter,
                        1.0,
                    );
                    o.begin_step(1)?;
                    GradReducer::overlapped(layout.clone(), Arc::new(o))
                } else {
                    GradReducer::new(layout.clone())
                };
                let scaling =
                    ReduceScaling { average_in_collective: false, average: false, post: 1.0 };
                let shards = reducer.reduce_scatter(&mut acc, &dp, scaling)?;
                anyhow::ensure!(acc.iter().all(|(_, g)| g.is_none()), "gradients left behind");
                // Expected: the summed gradients laid out in the buffer, this rank's shard.
                let mut expected = Vec::new();
                for &(b, k) in &layout.buckets() {
                    let buf = &layout.buffers[b];
                    let bucket = &buf.buckets[k];
                    let mut flat = vec![0f32; bucket.len()];
                    for span in &buf.params[bucket.params.clone()] {
                        let (g0, g1) =
                            (grad(0, span.index, span.numel), grad(1, span.index, span.numel));
                        for i in 0..span.numel {
                            flat[span.start - bucket.range.start + i] = g0[i] + g1[i];
                        }
                    }
                    let n = bucket.len() / 2;
                    expected.push(flat[rank * n..(rank + 1) * n].to_vec());
                }
                let got: Vec<Vec<f32>> =
                    shards.iter().map(|t| t.to_vec1::<f32>()).collect::<Result<_>>()?;
                anyhow::ensure!(got == expected, "rank {rank}: {got:?} != {expected:?}");
                Ok(got.len())
            })
            .unwrap();
            assert!(results.iter().all(|&n| n >= 1), "{bucket_size:?}: {results:?}");
        }
    }
}
