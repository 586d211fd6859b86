//! fp32 master weights stored as the bf16 parameter plus a 16-bit remainder
//! (`optimizer.store_param_remainders`, Transformer Engine's `FusedAdam` layout).
//!
//! An f32 value's high 16 bits are a bf16 value truncated toward zero; its low 16 bits, read as
//! an `i16`, are the remainder. When the remainder is negative (low half ≥ 0x8000) the high half
//! is rounded up by one bit pattern, so the parameter is the master rounded to nearest with
//! ties away from zero, and `master bits = (param bits << 16) + sign_extend(remainder)` holds
//! for every f32 (wrapping), which makes the pair an exact fp32 master in 4 bytes instead of 6.
//! Round-to-nearest-even (a plain cast) would need a 17th bit: at a tie both neighbours are
//! reachable.
//!
//! The functions here are the reference; on a GPU the same bit arithmetic runs in
//! `kernels/adamw.cu`, fused into the Adam step.

use candle_core::{DType, Result, Tensor};
use half::bf16;

/// The bf16 parameter bits and the remainder of one f32 master.
pub fn split_bits(master: f32) -> (u16, i16) {
    let bits = master.to_bits();
    let rem = bits as u16 as i16;
    let hi = ((bits >> 16) as u16).wrapping_add(u16::from(rem < 0));
    (hi, rem)
}

/// The f32 master of a bf16 parameter's bits and its remainder.
pub fn merge_bits(hi: u16, rem: i16) -> f32 {
    f32::from_bits(((hi as u32) << 16).wrapping_add(rem as i32 as u32))
}

/// An f32 `master` as its bf16 parameter and i16 remainder, on the master's device.
pub fn split(master: &Tensor) -> Result<(Tensor, Tensor)> {
    if master.dtype() != DType::F32 {
        candle_core::bail!("param remainders: the master must be f32, got {:?}", master.dtype());
    }
    #[cfg(feature = "cuda")]
    if master.device().is_cuda() {
        return crate::ops::cuda::adamw::remainder_split(&master.contiguous()?);
    }
    let (hi, rem): (Vec<bf16>, Vec<i16>) = master
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|m| {
            let (h, r) = split_bits(m);
            (bf16::from_bits(h), r)
        })
        .unzip();
    let dev = master.device();
    Ok((Tensor::from_vec(hi, master.shape(), dev)?, Tensor::from_vec(rem, master.shape(), dev)?))
}

/// The f32 master of a bf16 `param` and its i16 `remainder` (same shape).
pub fn merge(param: &Tensor, remainder: &Tensor) -> Result<Tensor> {
    if param.dtype() != DType::BF16 || remainder.dtype() != DType::I16 {
        candle_core::bail!(
            "param remainders need a bf16 parameter and i16 remainders, got {:?} and {:?}",
            param.dtype(),
            remainder.dtype()
        );
    }
    if param.dims() != remainder.dims() {
        candle_core::bail!(
            "param remainders: parameter {:?} and remainder {:?} differ in shape",
            param.dims(),
            remainder.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if param.device().is_cuda() {
        return crate::ops::cuda::adamw::remainder_merge(
            &param.contiguous()?,
            &remainder.contiguous()?,
        );
    }
    let hi = param.flatten_all()?.to_vec1::<bf16>()?;
    let rem = remainder.flatten_all()?.to_vec1::<i16>()?;
    let master: Vec<f32> = hi.iter().zip(&rem).map(|(h, &r)| merge_bits(h.to_bits(), r)).collect();
    Tensor::from_vec(master, param.shape(), param.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every remainder of a spread of high halves (both signs, zero, subnormals, the largest
    /// finite values) survives the round trip, bit for bit.
    #[test]
    fn split_then_merge_is_exact_for_every_low_half() {
        for hi in [0x0000u32, 0x0001, 0x3f80, 0x4049, 0x7f7f, 0x8000, 0x8001, 0xbf80, 0xc2c8] {
            for lo in 0..=0xffffu32 {
                let bits = (hi << 16) | lo;
                let m = f32::from_bits(bits);
                let (h, r) = split_bits(m);
                assert_eq!(merge_bits(h, r).to_bits(), bits, "bits {bits:#010x}");
            }
        }
    }

    /// The parameter is the master rounded to the nearest bf16, ties away from zero.
    #[test]
    fn the_parameter_is_the_master_rounded_half_away_from_zero() {
        let cases = [
            (1.0f32, 1.0f32),
            // 1 + 2^-8 lies halfway between bf16 1.0 and 1.0078125: away from zero.
            (1.0 + 2f32.powi(-8), 1.0078125),
            (-(1.0 + 2f32.powi(-8)), -1.0078125),
            // Just below the tie: down.
            (f32::from_bits(0x3f80_7fff), 1.0),
            (f32::from_bits(0xbf80_7fff), -1.0),
            // Just above: up.
            (f32::from_bits(0x3f80_8001), 1.0078125),
        ];
        for (master, want) in cases {
            let (h, _) = split_bits(master);
            assert_eq!(bf16::from_bits(h).to_f32(), want, "master {master:e}");
        }
        // Away from ties it agrees with the round-to-nearest-even cast.
        for bits in (0u32..u32::MAX).step_by(851_981) {
            let m = f32::from_bits(bits);
            if !m.is_finite() || bits & 0xffff == 0x8000 {
                continue;
            }
            assert_eq!(split_bits(m).0, bf16::from_f32(m).to_bits(), "bits {bits:#010x}");
        }
    }

    #[test]
    fn tensors_round_trip_and_keep_their_shape() -> Result<()> {
        let vals: Vec<f32> = (0..24).map(|i| (i as f32 - 11.3) * 0.0371).collect();
        let master = Tensor::from_vec(vals.clone(), (4, 6), &Device::Cpu)?;
        let (hi, rem) = split(&master)?;
        assert_eq!((hi.dtype(), rem.dtype(), hi.dims()), (DType::BF16, DType::I16, &[4, 6][..]));
        let back = merge(&hi, &rem)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(back, vals);
        let err = merge(&hi, &rem.reshape((6, 4))?).unwrap_err().to_string();
        assert!(err.contains("differ in shape"), "{err}");
        Ok(())
    }
}
