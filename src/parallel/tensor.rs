//! Tensor-parallel building blocks (Megatron's `mappings.py`, `layers.py` and
//! `cross_entropy.py`): the conjugate pair of region ops as candle CustomOps with backward,
//! the vocab-parallel embedding and the vocab-parallel cross-entropy.
//!
//! - [`TensorParallel::copy_to_region`] (`f`): identity forward, all-reduce of the gradient
//!   backward; placed before a column-parallel linear.
//! - [`TensorParallel::reduce_from_region`] (`g`): all-reduce forward, identity backward;
//!   placed after a row-parallel linear (before its replicated bias).
//!
//! - Sequence parallelism ([`TensorParallel::with_sequence_parallel`]): the activations
//!   between TP regions are split along the sequence; [`TensorParallel::enter_column`]
//!   all-gathers them (reduce-scatter backward) and [`TensorParallel::exit_row`]
//!   reduce-scatters (all-gather backward).
//!
//! With these, replicated parameters (norms, row-parallel biases) receive the same gradient
//! on every TP rank, equal to the TP=1 gradient, and sharded parameters receive their shard of
//! it. Replicated weights that only see a rank's share of the data (QK-norm always; the layer
//! norms and row-parallel biases under sequence parallelism) enter the graph through
//! `copy_to_region`, so their gradients are summed over TP in backward: no gradient
//! reduction over TP is needed after backward.
//!
//! The forward passes copy the storage (a host copy on CPU, a device copy on CUDA, where the
//! collectives go through NCCL).

use super::comm::{Communicator, ReduceOp};
use crate::model::Param;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// A contiguous copy of CPU storage (the forward of both region ops).
fn copy_storage(s: &CpuStorage, l: &Layout, op: &str) -> Result<CpuStorage> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    Ok(match s {
        CpuStorage::U8(v) => CpuStorage::U8(v[a..b].to_vec()),
        CpuStorage::U32(v) => CpuStorage::U32(v[a..b].to_vec()),
        CpuStorage::I64(v) => CpuStorage::I64(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        _ => candle_core::bail!("{op}: dtype not supported"),
    })
}

/// A contiguous copy of CUDA storage (the forward of both region ops on a GPU).
#[cfg(feature = "cuda")]
fn copy_cuda_storage(
    s: &candle_core::CudaStorage,
    l: &Layout,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::{BackendDevice, BackendStorage};
    let mut out = s.device().zeros_impl(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut out, 0, l)?;
    Ok((out, l.shape().clone()))
}

/// `f`: identity forward, all-reduce (sum) of the gradient over the TP group backward.
struct CopyToRegion(Arc<dyn Communicator>);

impl CustomOp1 for CopyToRegion {
    fn name(&self) -> &'static str {
        "copy-to-tp-region"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((copy_storage(s, l, self.name())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_cuda_storage(s, l)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.all_reduce(grad, ReduceOp::Sum)?))
    }
}

/// What the backward of a [`Precomputed`] op does with the output gradient.
#[derive(Debug, Clone, Copy)]
enum GradComm {
    /// Pass it through (`g` of the conjugate pair).
    Identity,
    /// All-gather along a dim (backward of a scatter / reduce-scatter).
    AllGather(usize),
    /// Reduce-scatter along a dim (backward of an all-gather).
    ReduceScatter(usize),
}

/// An op whose forward value was computed by a collective outside the graph (the second
/// argument, copied as the result) and whose backward sends the gradient through another
/// collective to the first argument (the local input).
struct Precomputed {
    name: &'static str,
    comm: Arc<dyn Communicator>,
    grad: GradComm,
}

impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((copy_storage(s2, l2, self.name)?, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_cuda_storage(s2, l2)
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = match self.grad {
            GradComm::Identity => grad.clone(),
            GradComm::AllGather(d) => self.comm.all_gather(&grad.contiguous()?, d)?,
            GradComm::ReduceScatter(d) => self.comm.reduce_scatter(&grad.contiguous()?, d)?,
        };
        Ok((Some(g), None))
    }
}

/// `value` (computed from `x` by a collective outside the graph) as the forward result, with
/// the gradient sent back to `x` through `grad` over `comm`.
fn precomputed(
    comm: &Arc<dyn Communicator>,
    x: &Tensor,
    value: Tensor,
    name: &'static str,
    grad: GradComm,
) -> Result<Tensor> {
    if !x.track_op() {
        // `x` carries no gradient: the collective's value is all there is.
        return Ok(value);
    }
    x.apply_op2(&value.contiguous()?, Precomputed { name, comm: comm.clone(), grad })
}

/// The members' `x` concatenated along `dim` (group-rank order) forward; backward, the sum of
/// the members' gradients, this rank's chunk of it (reduce-scatter). Sequence parallelism
/// gathers activations with it, context parallelism keys and values.
pub fn gather_with_reduce_scatter_grad(
    comm: &Arc<dyn Communicator>,
    x: &Tensor,
    dim: usize,
    name: &'static str,
) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    let x = x.contiguous()?;
    let full = comm.all_gather(&x.detach(), dim)?;
    precomputed(comm, &x, full, name, GradComm::ReduceScatter(dim))
}

/// This rank's tensor-parallel group, with the region ops of Megatron's TP layers.
#[derive(Debug, Clone)]
pub struct TensorParallel {
    comm: Arc<dyn Communicator>,
    sequence_parallel: bool,
}

/// Flat u32 `ids` as ids in the shard of `rows` rows that starts at `start`: `(local ids,
/// here)`, `outside` as the local id of an id in another shard and `here` u8, 1 where the id
/// lies in this one. Computed where the ids are: reading them back to the host would wait
/// for all the work queued before.
fn shard_ids(ids: &Tensor, start: usize, rows: usize, outside: u32) -> Result<(Tensor, Tensor)> {
    let (start, end) = (start as u32, (start + rows) as u32);
    let here = ids.ge(start)?.mul(&ids.lt(end)?)?;
    // Clamped first: u32 ids below `start` would wrap.
    let shifted = ids.maximum(start)?.broadcast_sub(&Tensor::new(start, ids.device())?)?;
    let outside = Tensor::full(outside, ids.shape(), ids.device())?;
    Ok((here.where_cond(&shifted, &outside)?, here))
}

impl TensorParallel {
    /// Wraps the TP group's communicator (without sequence parallelism).
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm, sequence_parallel: false }
    }
    /// Turns Megatron's sequence parallelism on or off: outside the TP regions the
    /// activations `[b, s, h]` are split over the ranks along the sequence (dim 1), entering
    /// a column-parallel linear all-gathers them and leaving a row-parallel linear
    /// reduce-scatters them.
    pub fn with_sequence_parallel(mut self, on: bool) -> Self {
        self.sequence_parallel = on && self.size() > 1;
        self
    }
    /// True with sequence parallelism.
    pub fn sequence_parallel(&self) -> bool {
        self.sequence_parallel
    }
    /// This rank's TP rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    /// TP size.
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// The underlying communicator.
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Identity forward; the backward all-reduces the gradient (input of a column-parallel
    /// linear).
    pub fn copy_to_region(&self, x: &Tensor) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        x.contiguous()?.apply_op1(CopyToRegion(self.comm.clone()))
    }

    /// All-reduce forward; identity backward (output of a row-parallel linear).
    pub fn reduce_from_region(&self, x: &Tensor) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        let x = x.contiguous()?;
        let sum = self.comm.all_reduce(&x.detach(), ReduceOp::Sum)?;
        self.precomputed(&x, sum, "reduce-from-tp-region", GradComm::Identity)
    }

    fn precomputed(
        &self,
        x: &Tensor,
        value: Tensor,
        name: &'static str,
        grad: GradComm,
    ) -> Result<Tensor> {
        precomputed(&self.comm, x, value, name, grad)
    }

    /// All-gather along `dim` forward, reduce-scatter of the gradient backward (Megatron's
    /// `gather_from_sequence_parallel_region`).
    pub fn gather_from_sequence_region(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        gather_with_reduce_scatter_grad(&self.comm, x, dim, "gather-from-sp-region")
    }

    /// Reduce-scatter along `dim` forward, all-gather of the gradient backward
    /// (`reduce_scatter_to_sequence_parallel_region`).
    pub fn reduce_scatter_to_sequence_region(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        let x = x.contiguous()?;
        let part = self.comm.reduce_scatter(&x.detach(), dim)?;
        self.precomputed(&x, part, "reduce-scatter-to-sp-region", GradComm::AllGather(dim))
    }

    /// This rank's chunk along `dim` forward, all-gather of the gradient backward
    /// (`scatter_to_sequence_parallel_region`).
    pub fn scatter_to_sequence_region(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let n = self.size();
        if n == 1 {
            return Ok(x.clone());
        }
        let len = x.dim(dim)?;
        if !len.is_multiple_of(n) {
            candle_core::bail!(
                "sequence parallelism: dim {dim} of {:?} is not divisible by TP size {n}",
                x.dims()
            );
        }
        let c = len / n;
        let part = x.detach().narrow(dim, self.rank() * c, c)?.contiguous()?;
        self.precomputed(&x.contiguous()?, part, "scatter-to-sp-region", GradComm::AllGather(dim))
    }

    /// Input of a column-parallel linear: all-gather of the sequence with sequence
    /// parallelism, else [`Self::copy_to_region`]. Activations are `[b, s, h]`.
    pub fn enter_column(&self, x: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            self.gather_from_sequence_region(x, 1)
        } else {
            self.copy_to_region(x)
        }
    }

    /// Output of a row-parallel linear: reduce-scatter over the sequence with sequence
    /// parallelism, else [`Self::reduce_from_region`].
    pub fn exit_row(&self, y: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            self.reduce_scatter_to_sequence_region(y, 1)
        } else {
            self.reduce_from_region(y)
        }
    }

    /// [`Self::enter_column`] outside autograd, for layers with a written-out backward: the
    /// whole sequence of `[b, s, h]` activations under sequence parallelism, else `x` as is.
    /// Their backward applies it to the output gradient of a row-parallel linear too.
    pub fn gather_sequence_untracked(&self, x: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            self.comm.all_gather(&x.contiguous()?, 1)
        } else {
            Ok(x.clone())
        }
    }

    /// [`Self::exit_row`] outside autograd: the sum of the ranks' partial `[b, s, h]`
    /// results (this rank's part of the sequence under sequence parallelism). The written-out
    /// backward applies it to the input gradient of a column-parallel linear too.
    pub fn reduce_partial_untracked(&self, y: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            self.comm.reduce_scatter(&y.contiguous()?, 1)
        } else {
            self.comm.all_reduce(&y.contiguous()?, ReduceOp::Sum)
        }
    }

    /// Concatenates the ranks' `local` tensors along `dim` (no gradient), e.g. vocab-parallel
    /// logits into full logits.
    pub fn gather(&self, local: &Tensor, dim: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(local.clone());
        }
        self.comm.all_gather(&local.detach(), dim)
    }

    /// Vocab-parallel embedding lookup (Megatron's `VocabParallelEmbedding`): `w_local`
    /// `[V/tp, h]` holds rows `rank·V/tp ..`; ids outside them contribute zeros and the
    /// all-reduce assembles the full lookup. `ids` is any shape of u32 → `[..ids, h]`.
    pub fn embedding(&self, ids: &Tensor, w_local: &Tensor) -> Result<Tensor> {
        let (rows, h) = w_local.dims2()?;
        let mut out_shape = ids.dims().to_vec();
        out_shape.push(h);
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        if self.size() == 1 {
            return w_local.index_select(&flat, 0)?.reshape(out_shape);
        }
        let (local, here) = shard_ids(&flat, self.rank() * rows, rows, 0)?;
        let keep = here.to_dtype(w_local.dtype())?.unsqueeze(1)?;
        let part = w_local.index_select(&local, 0)?.broadcast_mul(&keep)?;
        self.reduce_from_region(&part)?.reshape(out_shape)
    }

    /// The `n` global `labels` as ids in this rank's vocabulary shard of `vl` rows:
    /// `(local ids, here)` as [`shard_ids`] gives them with `outside` for labels in another
    /// rank's shard, checked against the whole vocabulary (`known_max`: see
    /// [`crate::ops::cross_entropy::max_id`]); `logits_dims` names the logits in the error.
    fn shard_labels(
        &self,
        labels: &Tensor,
        logits_dims: &[usize],
        (n, vl): (usize, usize),
        outside: u32,
        known_max: Option<u32>,
    ) -> Result<(Tensor, Tensor)> {
        if labels.elem_count() != n {
            candle_core::bail!("labels {:?} do not match logits {logits_dims:?}", labels.dims());
        }
        let vocab = vl * self.size();
        let labels = crate::ops::cross_entropy::checked_labels(labels, vocab, known_max)?;
        shard_ids(&labels, self.rank() * vl, vl, outside)
    }

    /// Vocab-parallel masked cross-entropy (Megatron's `_VocabParallelCrossEntropy`) of
    /// local logits `[b, s, V/tp]` against global `labels` `[b, s]`, weighted by `loss_mask`;
    /// returns `(Σ mask·CE, Σ mask)` as [`crate::ops::masked_cross_entropy`] does, identical
    /// on every TP rank. The max and the two sums are all-reduced over the group.
    pub fn cross_entropy(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        loss_mask: &Tensor,
    ) -> Result<(Tensor, f64)> {
        let logits = crate::ops::cross_entropy::at_least_f32(logits)?;
        let (b, s, vl) = logits.dims3()?;
        let n = b * s;
        let (local, here) = self.shard_labels(labels, logits.dims(), (n, vl), 0, None)?;
        let x = logits.reshape((n, vl))?;
        // The shift cancels analytically, so a detached global max keeps the gradient exact.
        let local_max = x.detach().max_keepdim(1)?;
        let max = if self.size() == 1 {
            local_max
        } else {
            self.comm.all_reduce(&local_max, ReduceOp::Max)?
        };
        let shifted = x.broadcast_sub(&max)?;
        let local = local.reshape((n, 1))?;
        let keep = here.to_dtype(x.dtype())?;
        let target = shifted.gather(&local, 1)?.reshape(n)?.mul(&keep)?;
        let target = self.reduce_from_region(&target)?;
        let sum_exp = self.reduce_from_region(&shifted.exp()?.sum(1)?)?;
        let ce = (sum_exp.log()? - target)?;
        let mask = loss_mask.to_dtype(ce.dtype())?.reshape(n)?;
        let sum = ce.mul(&mask)?.sum_all()?;
        let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((sum, count))
    }
}

/// What the backward of [`TensorParallel::cross_entropy_untracked`] needs.
#[derive(Debug, Clone)]
pub struct VocabShardCe {
    /// Shard-local label ids `[N]` (u32::MAX where the label is in another shard).
    labels: Tensor,
    /// `[N]` u8: the label is in this shard.
    here: Tensor,
    /// Log-sum-exp over the whole vocabulary `[N]`.
    lse: Tensor,
}

impl TensorParallel {
    /// Vocab-parallel cross-entropy outside autograd, for the written-out output layer:
    /// per-token losses `[N]` (f32 for half-precision logits; the same on every rank) of this
    /// rank's logits `[N, V/tp]` against global `labels` `[N]`. Each rank reduces its shard to
    /// a log-sum-exp and the logit at the label (the fused kernel on CUDA), so only `[N]`
    /// vectors cross the group: an all-gather of the shards' log-sum-exps and an all-reduce
    /// of the label logits.
    pub fn cross_entropy_untracked(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        known_max: Option<u32>,
    ) -> Result<(Tensor, VocabShardCe)> {
        let (n, vl) = logits.dims2()?;
        let (labels, here) =
            self.shard_labels(labels, logits.dims(), (n, vl), u32::MAX, known_max)?;
        let (lse, target) = crate::ops::manual::ce_shard_stats(logits, &labels, &here)?;
        let (lse, target) = if self.size() == 1 {
            (lse, target)
        } else {
            // log Σ_r exp(lse_r), shifted by the largest for stability.
            let all = self.comm.all_gather(&lse.unsqueeze(0)?.contiguous()?, 0)?;
            let m = all.max_keepdim(0)?;
            let lse = (all.broadcast_sub(&m)?.exp()?.sum_keepdim(0)?.log()? + m)?.squeeze(0)?;
            (lse, self.comm.all_reduce(&target, ReduceOp::Sum)?)
        };
        let ce = (&lse - target)?;
        Ok((ce, VocabShardCe { labels, here, lse }))
    }

    /// Gradient of this rank's logits (in their dtype; on CUDA written over them) for the
    /// per-token loss gradients `g` `[N]` of [`Self::cross_entropy_untracked`].
    pub fn cross_entropy_backward_untracked(
        &self,
        logits: Tensor,
        state: &VocabShardCe,
        g: &Tensor,
    ) -> Result<Tensor> {
        crate::ops::manual::ce_shard_backward(logits, &state.labels, &state.here, &state.lse, g)
    }
}

/// Whether `param`'s gradient counts in the global gradient norm on this TP rank, so that
/// every element of the model counts once: TP-sharded parameters everywhere, replicated ones
/// only on TP rank 0 (megatron-core's `param_is_not_tensor_parallel_duplicate`), and never the
/// last stage's tied copy of the embedding (`param_is_not_shared`). See
/// [`super::data::model_parallel_grad_sq_norm`].
pub fn counts_in_grad_norm(param: &Param, tp_rank: usize) -> bool {
    !param.shared_embedding && (param.partition_dim.is_some() || tp_rank == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::comm::LocalWorld;
    use candle_core::{Device, Var};
    use std::time::Duration;

    /// Ids below, inside and past a shard: local ids only inside it (no u32 wrap below).
    #[test]
    fn shard_ids_keep_only_this_shards_ids() {
        let ids = Tensor::new(&[0u32, 3, 4, 6, 7, 11], &Device::Cpu).unwrap();
        let (local, here) = shard_ids(&ids, 4, 3, u32::MAX).unwrap();
        let m = u32::MAX;
        assert_eq!(local.to_vec1::<u32>().unwrap(), [m, m, 0, 2, m, m]);
        assert_eq!(here.to_vec1::<u8>().unwrap(), [0, 0, 1, 1, 0, 0]);
    }

    /// A label past the vocabulary is refused by the host's maximum when one is given, by
    /// the device's otherwise.
    #[test]
    fn vocab_parallel_labels_are_checked_against_the_whole_vocabulary() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let err = |labels: &[u32], known: Option<u32>| {
            let world = LocalWorld::new(1, Duration::from_secs(5));
            let tpg = TensorParallel::new(Arc::new(world.world_group(0).unwrap()));
            let labels = Tensor::new(labels, &Device::Cpu).unwrap();
            tpg.cross_entropy_untracked(&logits, &labels, known).err().map(|e| e.to_string())
        };
        assert!(err(&[1, 3], None).is_none());
        assert!(err(&[1, 4], None).unwrap().contains("label id 4 out of range"));
        assert!(err(&[1, 3], Some(9)).unwrap().contains("label id 9 out of range"));
    }

    /// Three TP ranks' written-out vocab-parallel cross-entropy equals the whole-vocabulary
    /// loss, and each rank's logits gradient equals its columns of autograd's gradient.
    #[test]
    fn untracked_vocab_parallel_ce_matches_the_whole_vocabulary() {
        let (n, v, tp) = (6usize, 12usize, 3usize);
        let vals: Vec<f32> = (0..n * v).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.4).collect();
        let logits = Tensor::from_vec(vals, (n, v), &Device::Cpu).unwrap();
        let labels = Tensor::from_vec(vec![0u32, 5, 11, 4, 8, 3], n, &Device::Cpu).unwrap();
        let g = Tensor::from_vec(vec![1f32, -0.5, 2.0, 0.25, 1.5, -1.0], n, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&logits).unwrap();
        let want = crate::ops::token_cross_entropy(x.as_tensor(), &labels).unwrap();
        let grads = want.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        let dwant = grads.get(x.as_tensor()).unwrap().clone();
        let vs = v / tp;
        let got = LocalWorld::run(tp, Duration::from_secs(20), |rank, world| {
            let tpg = TensorParallel::new(Arc::new(world.world_group(rank)?));
            let shard = logits.narrow(1, rank * vs, vs)?;
            let (ce, state) = tpg.cross_entropy_untracked(&shard, &labels, None)?;
            let d = tpg.cross_entropy_backward_untracked(shard, &state, &g)?;
            Ok((ce.to_vec1::<f32>()?, d))
        })
        .unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        for (rank, (ce, d)) in got.iter().enumerate() {
            for (a, b) in ce.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "rank {rank}: loss {ce:?} vs {want:?}");
            }
            let dw = dwant.narrow(1, rank * vs, vs).unwrap();
            let diff = (d - &dw).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>();
            assert!(diff.unwrap() < 1e-6, "rank {rank}: gradient differs");
        }
    }
}
