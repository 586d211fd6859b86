//! Context parallelism (`model.context_parallel_size`): the ranks of a CP group split every
//! sequence. As megatron-core's `get_batch_on_this_cp_rank`, the sequence is cut into
//! `2·CP` equal chunks and CP rank `r` holds chunks `r` and `2·CP−1−r`, so each rank gets
//! the same share of causal-attention work.
//!
//! Every op of a layer except attention is per token and runs on the local chunks as is.
//! Attention all-gathers keys and values over the CP group (Transformer Engine's
//! `cp_comm_type = "all_gather"`; the gradient reduce-scatters back) and lets each local
//! query chunk attend, causally, to the keys up to its own end.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::comm::Communicator;
use super::tensor::gather_with_reduce_scatter_grad;
use crate::model::Microbatch;
use crate::ops::manual::{self, AttnState};
use crate::ops::{self, AttentionShape, AttnMask, DropoutRng};

/// The two sequence chunks (of `2·size`) that CP rank `rank` holds, in its local order.
pub fn local_chunks(rank: usize, size: usize) -> [usize; 2] {
    [rank, 2 * size - 1 - rank]
}

/// CP rank `rank`'s part of `t` along `dim`: chunks [`local_chunks`] of `2·size`, concatenated.
pub fn split_sequence(t: &Tensor, dim: usize, rank: usize, size: usize) -> Result<Tensor> {
    if size == 1 {
        return Ok(t.clone());
    }
    let len = t.dim(dim)?;
    if !len.is_multiple_of(2 * size) {
        bail!(
            "context parallelism: sequence length {len} is not divisible by 2 × context_parallel_size = {}",
            2 * size
        );
    }
    let c = len / (2 * size);
    let [a, b] = local_chunks(rank, size);
    Ok(Tensor::cat(&[t.narrow(dim, a * c, c)?, t.narrow(dim, b * c, c)?], dim)?)
}

/// CP rank `rank`'s part of micro-batch `mb`: tokens, labels, loss mask and position ids
/// split along the sequence by [`split_sequence`] (megatron-core's `get_batch_on_this_cp_rank`).
pub fn split_microbatch(mb: &Microbatch, rank: usize, size: usize) -> Result<Microbatch> {
    if mb.attention_mask.is_some() || mb.cu_seqlens.is_some() {
        bail!(
            "context parallelism runs causal attention only: micro-batches with an attention \
             mask or packed sequences (cu_seqlens) cannot be split over context_parallel_size > 1"
        );
    }
    let split = |t: &Tensor| split_sequence(t, 1, rank, size);
    let position_ids = match &mb.position_ids {
        Some(p) => p.clone(),
        None => {
            let (b, s) = mb.tokens.dims2()?;
            Tensor::arange(0u32, s as u32, mb.tokens.device())?.unsqueeze(0)?.repeat((b, 1))?
        }
    };
    Ok(Microbatch {
        tokens: split(&mb.tokens)?,
        labels: split(&mb.labels)?,
        loss_mask: split(&mb.loss_mask)?,
        position_ids: Some(split(&position_ids)?),
        attention_mask: None,
        cu_seqlens: None,
        // This rank's share of the targets; their summaries would be read back if needed.
        host_stats: None,
    })
}

/// What [`ContextParallel::attention_forward`] keeps for the backward: the gathered keys and
/// values `[b, groups, s, d]` (sequence order) and the attention state of each local query
/// chunk.
#[derive(Debug, Clone)]
pub struct CpAttnState {
    k: Tensor,
    v: Tensor,
    chunks: Vec<AttnState>,
}

/// This rank's context-parallel group.
#[derive(Debug, Clone)]
pub struct ContextParallel {
    comm: Arc<dyn Communicator>,
}

impl ContextParallel {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm }
    }
    /// This rank's CP rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    /// CP size.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Where sequence chunk `i` sits among the gathered ranks' chunks (rank `r`'s two chunks
    /// at slots `2r` and `2r + 1`).
    fn gathered_slot(&self, i: usize) -> usize {
        let n = self.size();
        if i < n {
            2 * i
        } else {
            2 * (2 * n - 1 - i) + 1
        }
    }

    /// Reorders `t` along `dim`, cut into `2·CP` chunks: chunk `i` of the result is chunk
    /// `slot(i)` of `t`.
    fn permute_chunks(
        &self,
        t: &Tensor,
        dim: usize,
        slot: impl Fn(usize) -> usize,
    ) -> Result<Tensor> {
        let chunks = 2 * self.size();
        let len = t.dim(dim)?;
        if !len.is_multiple_of(chunks) {
            bail!("context parallelism: length {len} along dim {dim} is not {chunks} equal chunks");
        }
        let c = len / chunks;
        let parts = (0..chunks)
            .map(|i| t.narrow(dim, slot(i) * c, c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    /// Gathered ranks' chunks (rank-major) in sequence order.
    fn to_sequence_order(&self, gathered: &Tensor, dim: usize) -> Result<Tensor> {
        self.permute_chunks(gathered, dim, |i| self.gathered_slot(i))
    }

    /// The inverse of [`Self::to_sequence_order`].
    fn to_rank_order(&self, sequence: &Tensor, dim: usize) -> Result<Tensor> {
        let n = self.size();
        // Slot 2r holds chunk r, slot 2r + 1 chunk 2n − 1 − r.
        self.permute_chunks(sequence, dim, |slot| {
            let r = slot / 2;
            if slot.is_multiple_of(2) {
                r
            } else {
                2 * n - 1 - r
            }
        })
    }

    /// Every rank's part of `x` along `dim`, put back in sequence order: the inverse of
    /// [`split_sequence`] over the group. Differentiable: the gradient of each chunk is summed
    /// over the ranks and returned to the rank that holds it.
    pub fn gather_sequence(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        let all = gather_with_reduce_scatter_grad(&self.comm, x, dim, "gather-cp-sequence")?;
        self.to_sequence_order(&all, dim)
    }

    /// Each local query chunk with what it attends to, from `[q, k, v, …]`: the chunk's rows
    /// of `q` (and of any further per-query tensors, e.g. the output gradient) and the rows of
    /// the gathered `k`, `v` (sequence order) up to the chunk's end.
    fn query_chunks<const N: usize>(&self, t: &[&Tensor; N]) -> Result<Vec<[Tensor; N]>> {
        let c = t[0].dim(2)? / 2;
        local_chunks(self.rank(), self.size())
            .into_iter()
            .enumerate()
            .map(|(half, chunk)| {
                let end = (chunk + 1) * c;
                let views = t
                    .iter()
                    .enumerate()
                    .map(|(i, x)| match i {
                        1 | 2 => x.narrow(2, 0, end),
                        _ => x.narrow(2, half * c, c),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(views.try_into().expect("one view per input"))
            })
            .collect()
    }

    /// The written-out form of [`Self::attention`] (no autograd, no dropout): the output and
    /// what [`Self::attention_backward`] needs, the gathered keys and values included.
    pub fn attention_forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window_left: Option<i64>,
        shape: AttentionShape,
    ) -> Result<(Tensor, CpAttnState)> {
        let gather = |t: &Tensor| -> Result<Tensor> {
            self.to_sequence_order(&self.comm.all_gather(&t.contiguous()?, 2)?, 2)
        };
        let (k, v) = (gather(k)?, gather(v)?);
        let mut outs = Vec::with_capacity(2);
        let mut chunks = Vec::with_capacity(2);
        for [q, k, v] in self.query_chunks(&[q, &k, &v])? {
            let mask = AttnMask::Causal { window_left };
            let (out, state) = manual::attention_forward(&q, &k, &v, mask, shape)?;
            outs.push(out);
            chunks.push(state);
        }
        Ok((Tensor::cat(&outs, 2)?, CpAttnState { k, v, chunks }))
    }

    /// `(dq, dk, dv)` of [`Self::attention_forward`] for `dout` `[b, heads, s_local, d]`: each
    /// query chunk's key/value gradients are summed over the sequence in f32, then over the
    /// ranks, each rank keeping those of its own chunks (reduce-scatter).
    pub fn attention_backward(
        &self,
        q: &Tensor,
        state: &CpAttnState,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let CpAttnState { k, v, chunks } = state;
        let full = k.dim(2)?;
        let mut dqs = Vec::with_capacity(2);
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        let pad = |g: &Tensor| -> Result<Tensor> {
            let g = g.to_dtype(DType::F32)?;
            let end = g.dim(2)?;
            Ok(if end == full { g } else { g.pad_with_zeros(2, 0, full - end)? })
        };
        let add = |acc: Option<Tensor>, g: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + g)?,
                None => g,
            }))
        };
        let views = self.query_chunks(&[q, k, v, dout])?;
        for ([q, k, v, dout], state) in views.into_iter().zip(chunks) {
            let (dq, dk_h, dv_h) = manual::attention_backward(&q, &k, &v, state, &dout)?;
            dqs.push(dq);
            dk = add(dk, pad(&dk_h)?)?;
            dv = add(dv, pad(&dv_h)?)?;
        }
        let scatter = |g: Option<Tensor>| -> Result<Tensor> {
            let g = g.expect("two query chunks");
            let mine = self.comm.reduce_scatter(&self.to_rank_order(&g, 2)?.contiguous()?, 2)?;
            Ok(mine.to_dtype(k.dtype())?)
        };
        Ok((Tensor::cat(&dqs, 2)?, scatter(dk)?, scatter(dv)?))
    }

    /// Causal self-attention of this rank's queries `q` `[b, heads, s_local, d]` over the keys
    /// and values `k`, `v` `[b, groups, s_local, d]` of the whole sequence: keys and values
    /// are gathered, then each local query chunk attends to the keys up to its own end (the
    /// queries are the last positions of those keys, as with a KV cache).
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window_left: Option<i64>,
        shape: AttentionShape,
        dropout: Option<(f64, &DropoutRng, (usize, usize))>,
    ) -> Result<Tensor> {
        let k = self.gather_sequence(k, 2)?;
        let v = self.gather_sequence(v, 2)?;
        let outs = self
            .query_chunks(&[q, &k, &v])?
            .into_iter()
            .map(|[q, k, v]| {
                let mask = AttnMask::Causal { window_left };
                ops::attention_auto(&q, &k, &v, mask, shape, dropout)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 2)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::comm::LocalWorld;
    use candle_core::{Device, Var};
    use std::time::Duration;

    #[test]
    fn chunks_balance_causal_work() {
        assert_eq!(local_chunks(0, 2), [0, 3]);
        assert_eq!(local_chunks(1, 2), [1, 2]);
        assert_eq!(local_chunks(3, 4), [3, 4]);
        let t = Tensor::arange(0u32, 8, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let part = |r| split_sequence(&t, 1, r, 2).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(part(0), [[0, 1, 6, 7]]);
        assert_eq!(part(1), [[2, 3, 4, 5]]);
        let err = split_sequence(&t, 1, 0, 3).unwrap_err().to_string();
        assert!(err.contains("not divisible by 2 × context_parallel_size = 6"), "{err}");
    }

    /// Gathering the parts restores the sequence on every rank, and the gradient of the gathered
    /// tensor comes back to each rank's chunks summed over the ranks.
    #[test]
    fn gather_inverts_split_and_sums_gradients() {
        let size = 3;
        let dev = Device::Cpu;
        let full = Tensor::arange(0f32, 12., &dev).unwrap().reshape((1, 12)).unwrap();
        let out = LocalWorld::run(size, Duration::from_secs(30), |r, world| {
            let comm = Arc::new(world.group(r, "cp", &[0, 1, 2])?);
            let cp = ContextParallel::new(comm);
            let local = Var::from_tensor(&split_sequence(&full, 1, r, size)?)?;
            let gathered = cp.gather_sequence(local.as_tensor(), 1)?;
            // Weighting by position makes each chunk's gradient tell where it landed.
            let w = (Tensor::arange(0f32, 12., &dev)? + 1.0)?;
            let loss = (gathered.squeeze(0)? * w)?.sum_all()?;
            let grads = loss.backward()?;
            let g = grads.get(local.as_tensor()).unwrap().to_vec2::<f32>()?;
            Ok((gathered.to_vec2::<f32>()?, g))
        })
        .unwrap();
        for (r, (gathered, grad)) in out.into_iter().enumerate() {
            assert_eq!(gathered, full.to_vec2::<f32>().unwrap());
            // Every rank back-propagated the same weights: the sum is 3 × (position + 1).
            let expected = ((full.clone() + 1.0).unwrap() * 3.0).unwrap();
            let expected = split_sequence(&expected, 1, r, size).unwrap();
            assert_eq!(grad, expected.to_vec2::<f32>().unwrap(), "rank {r}");
        }
    }
}
