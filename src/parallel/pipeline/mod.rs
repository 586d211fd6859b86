//! Pipeline parallelism: the order in which a rank runs forward and backward passes of its
//! model chunks ([`schedule`]: megatron-core's 1F1B, interleaved and forward-only schedules),
//! and the stage-to-stage transfers of activations and their gradients ([`p2p`]).

pub mod p2p;
pub mod plan;
pub mod schedule;

pub use p2p::PipelineP2p;
pub use schedule::{schedule, Op, ScheduleSpec};
