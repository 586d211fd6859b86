//! Parallelism: Megatron's rank layout ([`topology`]), communicators between ranks
//! ([`comm`]), the tensor-parallel building blocks used by the model ([`tensor`]), rank
//! discovery from launcher environments ([`launch`]), one rank's communicators for all its
//! groups ([`groups`]), data-parallel gradient reduction ([`data`], [`ddp`]) and pipeline
//! schedules with their stage-to-stage transfers ([`pipeline`]).

pub mod comm;
pub mod context;
pub mod data;
pub mod ddp;
pub mod groups;
pub mod launch;
pub mod pipeline;
pub mod spawn;
pub mod tensor;
pub mod topology;
pub mod watchdog;

pub use comm::{Communicator, ReduceOp};

/// Least common multiple: lengths that split evenly over several parallel sizes (bucket
/// padding, SFT batch padding).
pub fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}
pub use groups::ProcessGroups;
pub use topology::{GroupKind, RankCoords, RankOrder, Topology};
