//! A minimal TensorBoard event-file writer: scalar summaries as TFRecord-framed `Event` protos.
//!
//! Record framing (TFRecord): `u64 len | u32 masked_crc32c(len) | data | u32 masked_crc32c(data)`.
//! `Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }`,
//! `Summary { repeated Value value = 1; }`, `Value { string tag = 1; float simple_value = 2; }`.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Appends scalar events to `events.out.tfevents.<secs>.<host>` in a log directory.
pub struct SummaryWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl SummaryWriter {
    /// Create the directory and a new event file in it.
    pub fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
        let now = wall_time();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let file =
            File::create(&path).with_context(|| format!("cannot create `{}`", path.display()))?;
        let mut w = SummaryWriter { out: BufWriter::new(file), path };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// Path of the event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record `value` under `tag` at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let mut val = Vec::new();
        put_bytes(&mut val, 1, tag.as_bytes());
        put_key(&mut val, 2, 5);
        val.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &val);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Push buffered events to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("cannot write `{}`", self.path.display()))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())?;
        Ok(())
    }
}

impl Drop for SummaryWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// TFRecord's masked CRC32C.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(buf, u64::from((field << 3) | wire));
}

fn put_double(buf: &mut Vec<u8>, field: u32, v: f64) {
    put_key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

/// Read back `(tag, step, value)` scalars from an event file, verifying every CRC.
pub fn read_scalars(path: &Path) -> Result<Vec<(String, i64, f32)>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        anyhow::ensure!(pos + 12 <= bytes.len(), "truncated record header at byte {pos}");
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        anyhow::ensure!(crc == masked_crc(len_bytes), "bad length CRC at byte {pos}");
        let start = pos + 12;
        anyhow::ensure!(start + len + 4 <= bytes.len(), "truncated record at byte {pos}");
        let data = &bytes[start..start + len];
        let dcrc = u32::from_le_bytes(bytes[start + len..start + len + 4].try_into().unwrap());
        anyhow::ensure!(dcrc == masked_crc(data), "bad data CRC at byte {pos}");
        parse_event(data, &mut out)?;
        pos = start + len + 4;
    }
    Ok(out)
}

fn parse_event(data: &[u8], out: &mut Vec<(String, i64, f32)>) -> Result<()> {
    let mut step = 0i64;
    let mut values = Vec::new();
    for (field, val) in fields(data)? {
        match (field, val) {
            (2, Field::Varint(v)) => step = v as i64,
            (5, Field::Bytes(summary)) => {
                for (f, v) in fields(summary)? {
                    if let (1, Field::Bytes(value)) = (f, v) {
                        let mut tag = String::new();
                        let mut x = f32::NAN;
                        for (vf, vv) in fields(value)? {
                            match (vf, vv) {
                                (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into(),
                                (2, Field::Fixed32(b)) => x = f32::from_le_bytes(b),
                                _ => {}
                            }
                        }
                        values.push((tag, x));
                    }
                }
            }
            _ => {}
        }
    }
    out.extend(values.into_iter().map(|(t, v)| (t, step, v)));
    Ok(())
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn fields(mut data: &[u8]) -> Result<Vec<(u32, Field<'_>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let key = read_varint(&mut data)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let value = match wire {
            0 => Field::Varint(read_varint(&mut data)?),
            1 => {
                anyhow::ensure!(data.len() >= 8, "truncated fixed64");
                data = &data[8..];
                Field::Fixed64
            }
            2 => {
                let n = read_varint(&mut data)? as usize;
                anyhow::ensure!(data.len() >= n, "truncated bytes field");
                let (b, rest) = data.split_at(n);
                data = rest;
                Field::Bytes(b)
            }
            5 => {
                anyhow::ensure!(data.len() >= 4, "truncated fixed32");
                let b = [data[0], data[1], data[2], data[3]];
                data = &data[4..];
                Field::Fixed32(b)
            }
            w => anyhow::bail!("unsupported protobuf wire type {w}"),
        };
        out.push((field, value));
    }
    Ok(out)
}

fn read_varint(data: &mut &[u8]) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first().ok_or_else(|| anyhow::anyhow!("truncated varint"))?;
        *data = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    anyhow::bail!("varint too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn scalars_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let mut w = SummaryWriter::new(dir.path()).unwrap();
            w.add_scalar("lm loss", 2.5, 1).unwrap();
            w.add_scalar("learning-rate", 3e-4, 300).unwrap();
            w.path().to_path_buf()
        };
        let got = read_scalars(&path).unwrap();
        assert_eq!(got, vec![("lm loss".into(), 1, 2.5), ("learning-rate".into(), 300, 3e-4)]);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(read_scalars(&path).unwrap_err().to_string().contains("CRC"));
    }
}
