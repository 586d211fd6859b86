//! One safetensors shard file, written in a single streaming pass that also computes its
//! CRC-32C and refuses NaN/Inf, and read back only when size and checksum match the index.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use safetensors::{Dtype, View};
use serde::{Deserialize, Serialize};

/// Size and checksum of one shard file, as recorded in `index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// File length in bytes.
    pub bytes: u64,
    /// CRC-32C (Castagnoli) of the whole file.
    pub crc32c: u32,
}

/// Write `tensors` as a safetensors file at `path` (fsynced) and return its size and CRC-32C.
/// A floating-point tensor holding NaN or Inf is an error naming it: a checkpoint must never
/// carry a diverged model.
pub fn write_shard(path: &Path, tensors: &[(String, Tensor)]) -> Result<FileInfo> {
    // Header: {"name": {"dtype", "shape", "data_offsets": [begin, end]}}, tensors back to back.
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let len = View::data_len(t);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": serde_json::to_value(View::dtype(t))?,
                "shape": t.dims(),
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut head = serde_json::to_vec(&header)?;
    // The data section starts 8-byte aligned; safetensors pads the header with spaces.
    while (head.len() + 8) % 8 != 0 {
        head.push(b' ');
    }
    let file =
        fs::File::create(path).with_context(|| format!("cannot write `{}`", path.display()))?;
    let write_err = || format!("cannot write `{}`", path.display());
    // This thread converts, checks and checksums tensor i+1 while another writes tensor i.
    let (crc, bytes, file) = std::thread::scope(|s| -> Result<(u32, u64, fs::File)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let writer = s.spawn(move || -> std::io::Result<fs::File> {
            let mut file = file;
            for buf in rx {
                file.write_all(&buf)?;
            }
            Ok(file)
        });
        let mut first = (head.len() as u64).to_le_bytes().to_vec();
        first.extend_from_slice(&head);
        let mut crc = crc32c::crc32c(&first);
        let mut bytes = first.len() as u64;
        let mut failed = tx.send(first).is_err();
        let mut finite_err = None;
        for (name, t) in tensors {
            if failed {
                break;
            }
            let data = View::data(t).into_owned();
            if !all_finite(View::dtype(t), &data) {
                finite_err = Some(name.clone());
                break;
            }
            crc = crc32c::crc32c_append(crc, &data);
            bytes += data.len() as u64;
            failed = tx.send(data).is_err();
        }
        drop(tx);
        let file = writer.join().map_err(|_| anyhow::anyhow!("shard writer thread panicked"))?;
        if let Some(name) = finite_err {
            bail!("tensor `{name}` holds NaN or Inf values; refusing to write it to a checkpoint");
        }
        Ok((crc, bytes, file.with_context(write_err)?))
    })?;
    file.sync_all().with_context(write_err)?;
    Ok(FileInfo { bytes, crc32c: crc })
}

/// Read a shard after checking its length and CRC-32C against `expected`.
pub fn read_shard(path: &Path, expected: &FileInfo) -> Result<HashMap<String, Tensor>> {
    let bytes = fs::read(path)
        .with_context(|| format!("cannot read checkpoint shard `{}`", path.display()))?;
    if bytes.len() as u64 != expected.bytes {
        bail!(
            "checkpoint shard `{}` has {} bytes, the index records {} (truncated or overwritten)",
            path.display(),
            bytes.len(),
            expected.bytes
        );
    }
    let crc = crc32c::crc32c(&bytes);
    if crc != expected.crc32c {
        bail!(
            "checkpoint shard `{}` is corrupted: its CRC-32C is {crc:#010x}, the index records {:#010x}",
            path.display(),
            expected.crc32c
        );
    }
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("cannot parse checkpoint shard `{}`", path.display()))
}

/// Whether every element of a little-endian float buffer is finite (integers always are).
/// Works on 64-bit words (SWAR): a lane is NaN/Inf when its exponent bits are all ones.
fn all_finite(dtype: Dtype, data: &[u8]) -> bool {
    // (exponent mask per lane, lane width in bytes)
    let (exp, width) = match dtype {
        Dtype::F64 => (0x7FF0_0000_0000_0000u64, 8),
        Dtype::F32 => (0x7F80_0000, 4),
        Dtype::BF16 => (0x7F80, 2),
        Dtype::F16 => (0x7C00, 2),
        _ => return true,
    };
    let bits = 8 * width;
    let (mut mask, mut ones, mut highs) = (0u64, 0u64, 0u64);
    for lane in 0..8 / width {
        mask |= exp << (lane * bits);
        ones |= 1 << (lane * bits);
        highs |= 1 << (lane * bits + bits - 1);
    }
    let mut words = data.chunks_exact(8);
    // x has a zero lane exactly where a lane's exponent is all ones (the sign bit of each
    // lane of x is clear, so the classic has-zero-lane test is exact).
    let bad = |w: u64| {
        let x = (w & mask) ^ mask;
        x.wrapping_sub(ones) & !x & highs != 0
    };
    if words.by_ref().any(|c| bad(u64::from_le_bytes(c.try_into().expect("8 bytes")))) {
        return false;
    }
    words.remainder().chunks_exact(width).all(|c| {
        let mut lane = [0u8; 8];
        lane[..width].copy_from_slice(c);
        let v = u64::from_le_bytes(lane);
        v & exp != exp
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_checks_every_float_width() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(all_finite(Dtype::F32, &f32s[..4]));
        assert!(!all_finite(Dtype::F32, &f32s));
        let inf = f64::INFINITY.to_le_bytes();
        assert!(!all_finite(Dtype::F64, &inf));
        assert!(all_finite(Dtype::F64, &1e300f64.to_le_bytes()));
        let b = half::bf16::from_f32(f32::NEG_INFINITY).to_bits().to_le_bytes();
        assert!(!all_finite(Dtype::BF16, &b));
        let h = half::f16::from_f32(65504.0).to_bits().to_le_bytes();
        assert!(all_finite(Dtype::F16, &h));
        assert!(!all_finite(Dtype::F16, &half::f16::NAN.to_bits().to_le_bytes()));
        // Every lane position of a word, and the tail after the last whole word.
        for n in [4usize, 5, 9] {
            for bad in 0..n {
                let v: Vec<u8> = (0..n)
                    .flat_map(|i| {
                        let x = if i == bad { f32::INFINITY } else { -3.3e38 };
                        half::bf16::from_f32(x).to_bits().to_le_bytes()
                    })
                    .collect();
                assert!(!all_finite(Dtype::BF16, &v), "n={n} bad={bad}");
                let f: Vec<u8> = (0..n)
                    .flat_map(|i| if i == bad { f32::NAN } else { f32::MAX }.to_le_bytes())
                    .collect();
                assert!(!all_finite(Dtype::F32, &f), "n={n} bad={bad}");
            }
            let ok: Vec<u8> = (0..n).flat_map(|i| (-(i as f32) * 1e30).to_le_bytes()).collect();
            assert!(all_finite(Dtype::F32, &ok));
        }
    }
}
