//! Megatron-core's contiguous gradient buffer layout (`_ParamAndGradBuffer`): the parameters of
//! one dtype are laid out back to front (the last parameter first, since backward produces its
//! gradient first) in one flat buffer, cut into buckets of about `bucket_size` elements.
//!
//! With the distributed optimizer every parameter starts at a multiple of 64 elements and every
//! bucket is padded to a multiple of `lcm(dp, 128)` (`lcm(dp, 128, 65536)` with
//! `pad_buckets_for_high_nccl_busbw`), so each data-parallel rank owns an equal contiguous
//! shard of every bucket, as megatron-core's `DistributedOptimizer` does. The gaps are zeros.

use crate::parallel::lcm;
use std::ops::Range;

use candle_core::DType;

/// Where one parameter lives in its buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpan {
    /// Index of the parameter in the caller's (optimizer's) order.
    pub index: usize,
    /// Offset of its first element in the buffer.
    pub start: usize,
    /// Number of elements.
    pub numel: usize,
    /// Its (TP-local) shape.
    pub dims: Vec<usize>,
}

impl ParamSpan {
    /// Buffer range of the parameter.
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.numel
    }
}

/// A run of whole parameters reduced by one collective.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Buffer range, padding included.
    pub range: Range<usize>,
    /// Indices into [`Buffer::params`] of the parameters in this bucket, in buffer order.
    pub params: Range<usize>,
}

impl Bucket {
    /// Elements, padding included.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// True for a bucket without elements (never built).
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Buffer range of data-parallel rank `rank`'s shard (the bucket splits evenly).
    pub fn shard(&self, rank: usize, dp: usize) -> Range<usize> {
        let n = self.len() / dp;
        let s = self.range.start + rank * n;
        s..s + n
    }
}

/// One flat buffer: the parameters sharing a (parameter dtype, reduction dtype) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    /// dtype of the model parameters in this buffer.
    pub param_dtype: DType,
    /// dtype gradients are reduced in (f32 with `grad_reduce_in_fp32` or for f32 params).
    pub reduce_dtype: DType,
    /// Parameters in buffer order (the caller's order reversed).
    pub params: Vec<ParamSpan>,
    /// Buckets in buffer order (the first holds the last parameters).
    pub buckets: Vec<Bucket>,
}

impl Buffer {
    /// dtype the gradients are kept in around the reduction (`ops::main_grads`): bf16
    /// parameters' are reduced in their main-grad dtype, f32 or bf16; others' are f32 (f64),
    /// whatever they travel in.
    pub fn main_grad_dtype(&self) -> DType {
        // FP8 primary weights (bf16 runs only) take the bf16 parameters' gradients.
        if matches!(self.param_dtype, DType::BF16 | DType::F8E4M3) {
            self.reduce_dtype
        } else {
            crate::train::optimizer::master_dtype(self.param_dtype)
        }
    }
}

/// How to lay the buffers out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayoutOptions {
    /// Data-parallel size.
    pub dp: usize,
    /// Elements per bucket; None ⇒ one bucket per buffer.
    pub bucket_size: Option<usize>,
    /// Pad parameter starts and bucket ends for the distributed optimizer.
    pub distributed_optimizer: bool,
    /// `ddp.pad_buckets_for_high_nccl_busbw`.
    pub pad_for_high_nccl_busbw: bool,
    /// `ddp.grad_reduce_in_fp32`.
    pub grad_reduce_in_fp32: bool,
}

/// All buffers of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferLayout {
    pub buffers: Vec<Buffer>,
    pub dp: usize,
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

impl BufferLayout {
    /// Lays out parameters given as (shape, dtype) in the caller's order.
    pub fn new(params: &[(Vec<usize>, DType)], o: &LayoutOptions) -> Self {
        let dp = o.dp.max(1);
        let bucket_multiple = if o.distributed_optimizer {
            let m = lcm(dp, 128);
            if o.pad_for_high_nccl_busbw {
                lcm(m, 1 << 16)
            } else {
                m
            }
        } else {
            1
        };
        let param_align = if o.distributed_optimizer { 64 } else { 1 };
        // Buffers in order of first appearance of their dtype (megatron-core keys a dict the
        // same way).
        let mut dtypes: Vec<DType> = Vec::new();
        for (_, d) in params {
            if !dtypes.contains(d) {
                dtypes.push(*d);
            }
        }
        let buffers = dtypes
            .into_iter()
            .map(|param_dtype| {
                let reduce_dtype = if o.grad_reduce_in_fp32 || param_dtype == DType::F64 {
                    crate::train::optimizer::master_dtype(param_dtype)
                } else if param_dtype == DType::F8E4M3 {
                    DType::BF16
                } else {
                    param_dtype
                };
                let mut spans = Vec::new();
                let mut buckets = Vec::new();
                let mut bucket_start = 0usize;
                let mut bucket_first = 0usize;
                let mut next = 0usize;
                let members = params.iter().enumerate().filter(|(_, (_, d))| *d == param_dtype);
                for (index, (dims, _)) in members.rev() {
                    let numel: usize = dims.iter().product();
                    let start = round_up(next, param_align);
                    let end = start + numel;
                    spans.push(ParamSpan { index, start, numel, dims: dims.clone() });
                    next = end;
                    if o.bucket_size.is_some_and(|b| end - bucket_start >= b) {
                        let padded = round_up(end, bucket_multiple);
                        buckets.push(Bucket {
                            range: bucket_start..padded,
                            params: bucket_first..spans.len(),
                        });
                        bucket_start = padded;
                        bucket_first = spans.len();
                        next = padded;
                    }
                }
                if bucket_first < spans.len() {
                    let padded = round_up(next, bucket_multiple);
                    buckets.push(Bucket {
                        range: bucket_start..padded,
                        params: bucket_first..spans.len(),
                    });
                }
                Buffer { param_dtype, reduce_dtype, params: spans, buckets }
            })
            .collect();
        Self { buffers, dp }
    }

    /// Every bucket of every buffer, in reduction order: (buffer index, bucket index).
    pub fn buckets(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (b, buf) in self.buffers.iter().enumerate() {
            for k in 0..buf.buckets.len() {
                out.push((b, k));
            }
        }
        out
    }

    /// The parts of parameters inside data-parallel rank `rank`'s shard of every bucket, in
    /// shard order.
    pub fn shard_slices(&self, rank: usize) -> Vec<ShardSlice> {
        let mut out = Vec::new();
        for (b, buf) in self.buffers.iter().enumerate() {
            for (k, bucket) in buf.buckets.iter().enumerate() {
                let shard = bucket.shard(rank, self.dp);
                for span in &buf.params[bucket.params.clone()] {
                    let lo = span.start.max(shard.start);
                    let hi = (span.start + span.numel).min(shard.end);
                    if lo < hi {
                        out.push(ShardSlice {
                            buffer: b,
                            bucket: k,
                            param: span.index,
                            param_offset: lo - span.start,
                            shard_offset: lo - shard.start,
                            len: hi - lo,
                        });
                    }
                }
            }
        }
        out
    }

    /// Total elements over all buffers, padding included.
    pub fn total_len(&self) -> usize {
        self.buffers.iter().flat_map(|b| b.buckets.iter()).map(Bucket::len).sum()
    }
}

/// A contiguous part of one parameter inside this rank's shard of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSlice {
    pub buffer: usize,
    pub bucket: usize,
    /// Parameter index in the caller's order.
    pub param: usize,
    /// Offset in the flattened parameter.
    pub param_offset: usize,
    /// Offset in the rank's shard of the bucket.
    pub shard_offset: usize,
    pub len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dp: usize, bucket: Option<usize>, dist: bool) -> LayoutOptions {
        LayoutOptions {
            dp,
            bucket_size: bucket,
            distributed_optimizer: dist,
            pad_for_high_nccl_busbw: false,
            grad_reduce_in_fp32: true,
        }
    }

    #[test]
    fn buffer_is_reversed_and_bucketed_like_megatron() {
        let p = vec![(vec![10], DType::F32), (vec![4, 5], DType::F32), (vec![7], DType::F32)];
        let l = BufferLayout::new(&p, &opts(2, Some(25), false));
        let b = &l.buffers[0];
        let order: Vec<usize> = b.params.iter().map(|s| s.index).collect();
        assert_eq!(order, vec![2, 1, 0]);
        // 7 + 20 = 27 ≥ 25 closes the first bucket; the last holds the first parameter.
        assert_eq!(b.buckets.len(), 2);
        assert_eq!(b.buckets[0].range, 0..27);
        assert_eq!(b.buckets[1].range, 27..37);
        assert_eq!(b.buckets[1].params, 2..3);
    }

    #[test]
    fn distributed_layout_pads_and_every_element_has_one_owner() {
        let p = vec![(vec![100], DType::F32), (vec![3, 70], DType::F32), (vec![5], DType::F32)];
        for dp in [1, 2, 3, 4] {
            let l = BufferLayout::new(&p, &opts(dp, Some(150), true));
            for buf in &l.buffers {
                for s in &buf.params {
                    assert_eq!(s.start % 64, 0);
                }
                for bk in &buf.buckets {
                    assert_eq!(bk.len() % lcm(dp, 128), 0);
                }
            }
            let mut owned = vec![0usize; 3];
            for r in 0..dp {
                for s in l.shard_slices(r) {
                    owned[s.param] += s.len;
                }
            }
            assert_eq!(owned, vec![100, 210, 5], "dp {dp}");
        }
    }
}
