//! Tensor ⇄ bytes for the CPU backends: a small header (dtype, dims) and the elements in
//! little-endian order, so any rank (thread or process) can rebuild the tensor exactly.

use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};

fn dtype_code(dtype: DType) -> Result<u8> {
    Ok(match dtype {
        DType::U8 => 0,
        DType::U32 => 1,
        DType::I64 => 2,
        DType::BF16 => 3,
        DType::F16 => 4,
        DType::F32 => 5,
        DType::F64 => 6,
        other => candle_core::bail!("communicator: dtype {other:?} is not supported"),
    })
}

fn code_dtype(code: u8) -> Result<DType> {
    Ok(match code {
        0 => DType::U8,
        1 => DType::U32,
        2 => DType::I64,
        3 => DType::BF16,
        4 => DType::F16,
        5 => DType::F32,
        6 => DType::F64,
        other => candle_core::bail!("communicator: corrupt message (dtype code {other})"),
    })
}

/// Serializes `t` (any device, any layout) into a self-describing byte buffer.
pub(crate) fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let dims = t.dims();
    let mut out =
        Vec::with_capacity(2 + 8 * dims.len() + t.elem_count() * t.dtype().size_in_bytes());
    out.push(dtype_code(t.dtype())?);
    out.push(u8::try_from(dims.len()).map_err(|_| candle_core::Error::Msg("rank > 255".into()))?);
    for &d in dims {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    match t.dtype() {
        DType::U8 => out.extend_from_slice(&flat.to_vec1::<u8>()?),
        DType::U32 => flat.to_vec1::<u32>()?.iter().for_each(|x| out.extend(x.to_le_bytes())),
        DType::I64 => flat.to_vec1::<i64>()?.iter().for_each(|x| out.extend(x.to_le_bytes())),
        DType::BF16 => {
            flat.to_vec1::<bf16>()?.iter().for_each(|x| out.extend(x.to_bits().to_le_bytes()))
        }
        DType::F16 => {
            flat.to_vec1::<f16>()?.iter().for_each(|x| out.extend(x.to_bits().to_le_bytes()))
        }
        DType::F32 => flat.to_vec1::<f32>()?.iter().for_each(|x| out.extend(x.to_le_bytes())),
        DType::F64 => flat.to_vec1::<f64>()?.iter().for_each(|x| out.extend(x.to_le_bytes())),
        _ => unreachable!("dtype checked by dtype_code"),
    }
    Ok(out)
}

/// The dtype and dims stored in the header of an encoded tensor.
pub(crate) fn header(bytes: &[u8]) -> Result<(DType, Vec<usize>)> {
    if bytes.len() < 2 {
        candle_core::bail!("communicator: corrupt message ({} bytes)", bytes.len());
    }
    let dtype = code_dtype(bytes[0])?;
    let nd = bytes[1] as usize;
    if bytes.len() < 2 + 8 * nd {
        candle_core::bail!("communicator: corrupt message header");
    }
    let dims = (0..nd)
        .map(|i| {
            let b: [u8; 8] = bytes[2 + 8 * i..10 + 8 * i].try_into().expect("8 bytes");
            u64::from_le_bytes(b) as usize
        })
        .collect();
    Ok((dtype, dims))
}

/// Rebuilds a tensor written by [`encode`] on `device`.
pub(crate) fn decode(bytes: &[u8], device: &Device) -> Result<Tensor> {
    let (dtype, dims) = header(bytes)?;
    let data = &bytes[2 + 8 * dims.len()..];
    let n: usize = dims.iter().product();
    if data.len() != n * dtype.size_in_bytes() {
        candle_core::bail!(
            "communicator: message for shape {dims:?} {dtype:?} has {} data bytes",
            data.len()
        );
    }
    macro_rules! le {
        ($t:ty, $w:expr, $conv:expr) => {{
            let v: Vec<$t> =
                data.chunks_exact($w).map(|c| $conv(c.try_into().expect("chunk"))).collect();
            Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?
        }};
    }
    let t = match dtype {
        DType::U8 => Tensor::from_vec(data.to_vec(), dims.as_slice(), &Device::Cpu)?,
        DType::U32 => le!(u32, 4, u32::from_le_bytes),
        DType::I64 => le!(i64, 8, i64::from_le_bytes),
        DType::BF16 => le!(bf16, 2, |b| bf16::from_bits(u16::from_le_bytes(b))),
        DType::F16 => le!(f16, 2, |b| f16::from_bits(u16::from_le_bytes(b))),
        DType::F32 => le!(f32, 4, f32::from_le_bytes),
        DType::F64 => le!(f64, 8, f64::from_le_bytes),
        _ => unreachable!("dtype checked by code_dtype"),
    };
    t.to_device(device)
}
