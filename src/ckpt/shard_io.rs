//! Checkpoint shard files: one safetensors file per rank, written in one streaming pass that
//! computes its CRC-32C and refuses NaN/Inf ([`crate::io::st_write`]), and mapped back only
//! when size and checksum match the index ([`crate::io::st_read`]).

use std::path::Path;

use anyhow::Result;

use crate::io::st_read::MappedSafetensors;
pub use crate::io::st_write::FileInfo;
use crate::io::st_write::{write_safetensors, OutTensor, WriteOptions};

/// Writes `tensors` as a checkpoint shard at `path` (fsynced); returns its size and CRC-32C.
/// A floating-point tensor holding NaN or Inf is an error naming it.
pub fn write_shard(path: &Path, tensors: Vec<OutTensor>) -> Result<FileInfo> {
    let info =
        write_safetensors(path, &tensors, WriteOptions { check_finite: true, metadata: None });
    // A long synchronous save is progress, not a hang.
    crate::parallel::watchdog::beat();
    info
}

/// Maps a shard after checking its length and CRC-32C against `expected`.
pub fn open_shard(path: &Path, expected: &FileInfo) -> Result<MappedSafetensors> {
    MappedSafetensors::open_verified(path, expected)
}
