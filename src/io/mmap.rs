//! The crate's read-only memory maps. `memmap2` marks mapping `unsafe` because the bytes
//! behind a `&[u8]` change (or vanish, raising SIGBUS) if another process modifies or truncates
//! the file while it is mapped. Keeping the `unsafe` here, once, makes that contract one
//! documented decision instead of a comment repeated at every call site.

use memmap2::{Mmap, UncheckedAdvice};
use std::fs::File;

/// Maps `file` read-only in full.
///
/// The files mbridge maps are either written once under a temporary name and renamed into
/// place, never modified afterwards (checkpoint shards, dataset index caches), or inputs the
/// user hands over to be read (HF safetensors, indexed datasets). As with every mmap reader
/// (numpy, safetensors, PyTorch), modifying such a file while mbridge runs is not supported:
/// it can only corrupt the values read or kill the process, never write anything.
pub fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only (PROT_READ, MAP_SHARED) and is only ever exposed as
    // `&[u8]` borrowed from the `Mmap`, so it cannot outlive the mapping; the remaining hazard,
    // a concurrent writer to the file, is excluded by the contract documented above.
    unsafe { Mmap::map(file) }
}

/// Drops the pages of `map[offset..offset + len]` from this process's resident set
/// (`MADV_DONTNEED`) once a streaming reader is done with them, so reading a model through its
/// map does not grow RSS to the model's size. The file's page cache is untouched; a later read
/// of the range faults the same bytes back in.
pub fn release(map: &Mmap, offset: usize, len: usize) {
    let len = len.min(map.len().saturating_sub(offset));
    if len == 0 {
        return;
    }
    // SAFETY: MADV_DONTNEED is only destructive for private or anonymous memory, where it
    // discards modified pages. This map is a read-only shared file mapping (see
    // `map_readonly`): it has no modified pages, and a later access re-reads the file, so the
    // bytes any `&[u8]` into it sees are unchanged.
    let result = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
    // Only a hint for memory use; correctness does not depend on it.
    if let Err(e) = result {
        tracing::debug!("madvise(DONTNEED) failed: {e}");
    }
}
