//! Data parallelism as megatron-core's `DistributedDataParallel`: gradients in contiguous
//! per-dtype buffers cut into buckets ([`buckets`]), reduced bucket by bucket
//! ([`reducer`]), optionally on a communication thread ([`pipeline`]), and the replica
//! consistency check ([`replica_check`]).

pub mod buckets;
pub mod pipeline;
pub mod reducer;
pub mod replica_check;

pub use buckets::{BufferLayout, LayoutOptions, ShardSlice};
pub use reducer::{GradReducer, ReduceScaling};
