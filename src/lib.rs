//! mbridge: Megatron Bridge reimplemented in Rust.
pub mod cli;
pub mod data;
