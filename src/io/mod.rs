//! Bulk file I/O shared by the checkpoint writer/reader and the HF bridge: read-only memory
//! maps (the crate's only `mmap` call), byte-level tensor views that slice and concatenate
//! without copying, and a streaming safetensors writer that checksums while it writes.
//!
//! ```text
//! mmap ──► MappedSafetensors (header + byte ranges) ──► Matrix (row/column slices, concat)
//!                                                          └─► write_safetensors (CRC-32C, large writes, fsync)
//! candle Tensor ──(zero-copy bytes of its CPU storage)──────────┘
//! ```
pub mod dtype;
pub mod matrix;
pub mod mmap;
pub mod st_read;
pub mod st_write;
