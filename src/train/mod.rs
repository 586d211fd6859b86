//! Training: learning-rate / weight-decay schedule, optimizers with fp32 master weights,
//! gradient accumulation and clipping. The loop itself builds on these.

pub mod clip;
pub mod grads;
pub mod optimizer;
mod optimizer_state;
mod schedule_resolve;
pub mod scheduler;
