//! The messages of a distributed checkpoint save (see [`super::save`]): rank 0's decisions to
//! every rank, every rank's file list to rank 0. Each is JSON (a `Result`, so an error on one
//! side reaches the other with its message) as a length and a byte tensor on the CPU.

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::format::WrittenShard;
use crate::parallel::comm::Communicator;

/// Rank 0's `value` on every rank (`value` is Some on rank 0 only): its error fails every
/// rank, so none waits for a step that rank 0 will not take.
pub(super) fn from_rank0<T: Serialize + DeserializeOwned>(
    world: Option<&dyn Communicator>,
    value: Option<Result<T>>,
) -> Result<T> {
    let Some(world) = world else {
        return value.unwrap_or_else(|| Err(anyhow!("internal error: no value on rank 0")));
    };
    if world.rank() == 0 {
        let value = value.unwrap_or_else(|| Err(anyhow!("internal error: no value on rank 0")));
        let wire: std::result::Result<&T, String> = value.as_ref().map_err(|e| format!("{e:#}"));
        broadcast_bytes(world, Some(serde_json::to_vec(&wire)?))?;
        return value;
    }
    let bytes = broadcast_bytes(world, None)?;
    let wire: std::result::Result<T, String> =
        serde_json::from_slice(&bytes).context("checkpoint save: bad message from rank 0")?;
    wire.map_err(|e| anyhow!("rank 0: {e}"))
}

/// Step 3: every rank's list of written files on rank 0 (Some there: all files, or the
/// failures of every rank that failed or could not be heard from); None on the other ranks.
/// The records (names, shapes, sizes, CRC-32Cs: a few hundred bytes per tensor) travel
/// rather than rank 0 reading the shards back to checksum them, which would cost it one read
/// of the whole checkpoint, the serial pass that writing on every rank removes.
/// Point-to-point sends, not an all-gather: only rank 0 needs them, and an all-gather would
/// send every list to every rank.
#[allow(clippy::type_complexity)]
pub(super) fn to_rank0(
    world: Option<&dyn Communicator>,
    mine: std::result::Result<Vec<WrittenShard>, String>,
) -> Result<Option<std::result::Result<Vec<WrittenShard>, anyhow::Error>>> {
    let Some(world) = world else {
        return Ok(Some(mine.map_err(|e| anyhow!(e))));
    };
    let rank = world.rank();
    if rank != 0 {
        send_bytes(world, &serde_json::to_vec(&mine)?, 0)?;
        return Ok(None);
    }
    let mut all = Vec::new();
    let mut failures = Vec::new();
    match mine {
        Ok(files) => all.extend(files),
        Err(e) => failures.push(format!("rank 0: {e}")),
    }
    for src in 1..world.size() {
        // A rank that cannot be heard from (gone, timed out) fails the save like one that
        // failed: rank 0 still removes the directory and tells the ranks that are left.
        let theirs = recv_bytes(world, src).and_then(|bytes| {
            serde_json::from_slice::<std::result::Result<Vec<WrittenShard>, String>>(&bytes)
                .context("bad file list")
        });
        match theirs {
            Ok(Ok(files)) => all.extend(files),
            Ok(Err(e)) => failures.push(format!("rank {src}: {e}")),
            Err(e) => failures.push(format!("rank {src}: {e:#}")),
        }
    }
    if failures.is_empty() {
        Ok(Some(Ok(all)))
    } else {
        Ok(Some(Err(anyhow!("{}", failures.join("; ")))))
    }
}

fn u8_tensor(bytes: &[u8]) -> Result<Tensor> {
    Ok(Tensor::from_vec(bytes.to_vec(), bytes.len(), &Device::Cpu)?)
}

fn len_tensor(len: usize) -> Result<Tensor> {
    let len = u32::try_from(len).context("checkpoint save: message over 4 GiB")?;
    Ok(Tensor::new(&[len], &Device::Cpu)?)
}

fn send_bytes(c: &dyn Communicator, bytes: &[u8], dst: usize) -> Result<()> {
    c.send(&len_tensor(bytes.len())?, dst)?;
    c.send(&u8_tensor(bytes)?, dst)?;
    Ok(())
}

fn recv_bytes(c: &dyn Communicator, src: usize) -> Result<Vec<u8>> {
    let len = c.recv(src, &(1,).into(), DType::U32, &Device::Cpu)?.to_vec1::<u32>()?[0];
    Ok(c.recv(src, &(len as usize,).into(), DType::U8, &Device::Cpu)?.to_vec1::<u8>()?)
}

/// Rank 0's bytes (Some there) on every rank.
fn broadcast_bytes(c: &dyn Communicator, bytes: Option<Vec<u8>>) -> Result<Vec<u8>> {
    let len = c.broadcast(&len_tensor(bytes.as_ref().map_or(0, Vec::len))?, 0)?;
    let len = len.to_vec1::<u32>()?[0] as usize;
    let data = match bytes {
        Some(b) => u8_tensor(&b)?,
        None => Tensor::zeros(len, DType::U8, &Device::Cpu)?,
    };
    Ok(c.broadcast(&data, 0)?.to_vec1::<u8>()?)
}
