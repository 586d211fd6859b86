//! mbridge: Megatron Bridge reimplemented in Rust.
pub mod bridge;
pub mod ckpt;
pub mod cli;
pub mod config;
pub mod data;
pub mod io;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod peft;
pub mod profiling;
pub mod train;
