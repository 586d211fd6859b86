//! Data parallelism as megatron-core's `DistributedDataParallel`: gradients in contiguous
//! per-dtype buffers cut into buckets ([`buckets`]), reduced bucket by bucket
//! ([`reducer`]), started during backward ([`overlap`]) as collectives in flight
//! ([`flights`]), and the replica consistency check ([`replica_check`]).

pub mod buckets;
pub mod flights;
pub mod overlap;
pub mod reducer;
pub mod replica_check;

pub use buckets::{BufferLayout, LayoutOptions, ShardSlice};
pub use flights::{Collective, Flights};
pub use overlap::BackwardOverlap;
pub use reducer::{GradReducer, ReduceScaling};
