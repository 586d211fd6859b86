//! Data parallelism as megatron-core's `DistributedDataParallel`: gradients in contiguous
//! per-dtype buffers cut into buckets ([`buckets`]), reduced bucket by bucket
//! ([`reducer`]), with overlap started during backward ([`overlap`]), parameter all-gathers
//! optionally on a communication thread ([`pipeline`]), and the replica consistency check
//! ([`replica_check`]).

pub mod buckets;
pub mod overlap;
pub mod pipeline;
pub mod reducer;
pub mod replica_check;

pub use buckets::{BufferLayout, LayoutOptions, ShardSlice};
pub use overlap::{BackwardOverlap, Collective};
pub use reducer::{GradReducer, ReduceScaling};
