//! Element types as files name them (safetensors `Dtype`) and as candle does, and the float
//! conversions import/export apply byte-for-byte (rounding exactly as candle's `to_dtype`).

use anyhow::{bail, Result};
use candle_core::DType;
use half::{bf16, f16};
use safetensors::Dtype;

/// The candle type of a safetensors element type, for the types mbridge reads.
pub fn from_st(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// The safetensors element type of a candle type.
pub fn to_st(d: DType) -> Result<Dtype> {
    Ok(match d {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::U8 => Dtype::U8,
        DType::U32 => Dtype::U32,
        DType::I64 => Dtype::I64,
        other => bail!("dtype {other:?} cannot be written to safetensors by mbridge"),
    })
}

/// Converts little-endian `src` elements of `from` into `to`, appending to `out`. Only the
/// float types convert (the bridge's `--dtype`); rounding is round-to-nearest-even, as candle's
/// `to_dtype` (both use `half`).
pub fn convert_into(src: &[u8], from: DType, to: DType, out: &mut Vec<u8>) -> Result<()> {
    if from == to {
        out.extend_from_slice(src);
        return Ok(());
    }
    let read: fn(&[u8]) -> f32 = match from {
        DType::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::BF16 => |b| bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F16 => |b| f16::from_le_bytes([b[0], b[1]]).to_f32(),
        other => bail!("cannot convert {other:?} tensors (float types only)"),
    };
    let n = src.len() / from.size_in_bytes();
    out.reserve(n * to.size_in_bytes());
    let chunks = src.chunks_exact(from.size_in_bytes());
    match to {
        DType::F32 => chunks.for_each(|c| out.extend_from_slice(&read(c).to_le_bytes())),
        DType::BF16 => {
            chunks.for_each(|c| out.extend_from_slice(&bf16::from_f32(read(c)).to_le_bytes()))
        }
        DType::F16 => {
            chunks.for_each(|c| out.extend_from_slice(&f16::from_f32(read(c)).to_le_bytes()))
        }
        other => bail!("cannot convert to {other:?} (float types only)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn conversions_round_like_candle() {
        let vals: Vec<f32> = vec![1.0, -0.0, 2.71, 1e-8, 65504.0, 1e30, -2.5e-3, 0.1];
        let t = Tensor::new(vals.as_slice(), &Device::Cpu).unwrap();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        for to in [DType::BF16, DType::F16] {
            let mut out = Vec::new();
            convert_into(&bytes, DType::F32, to, &mut out).unwrap();
            let want = t.to_dtype(to).unwrap();
            let mut back = Vec::new();
            convert_into(&out, to, DType::F32, &mut back).unwrap();
            let got: Vec<f32> =
                back.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(got, want.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), "{to:?}");
        }
        assert!(convert_into(&[0; 8], DType::I64, DType::F32, &mut Vec::new()).is_err());
    }
}
