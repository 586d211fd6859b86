//! `train.check_weight_hash_across_dp_replicas_interval`: every data-parallel replica must hold
//! bit-identical weights (megatron-core's `check_param_hashes_across_dp_replicas`). Each rank
//! hashes every parameter, the hashes are all-gathered over the data-parallel group and any
//! rank that differs from DP rank 0 is named with the first parameters that differ.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

use crate::parallel::comm::Communicator;

/// FNV-1a 64 of a tensor's values (cast losslessly to f32, or f64 for f64) and its shape.
pub fn tensor_hash(t: &Tensor) -> candle_core::Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for d in t.dims() {
        eat(&(*d as u64).to_le_bytes());
    }
    let flat = t.flatten_all()?;
    if t.dtype() == DType::F64 {
        for v in flat.to_vec1::<f64>()? {
            eat(&v.to_bits().to_le_bytes());
        }
    } else {
        for v in flat.to_dtype(DType::F32)?.to_vec1::<f32>()? {
            eat(&v.to_bits().to_le_bytes());
        }
    }
    Ok(h)
}

/// Compares the weights `params` (name, variable) across the data-parallel group `dp`; every
/// member returns the same error when some replica differs, naming the ranks (global ranks
/// from `dp_members`) and parameters.
pub fn check_replicas(
    params: &[(String, Var)],
    dp: &dyn Communicator,
    dp_members: &[usize],
    iteration: u64,
) -> Result<()> {
    if dp.size() == 1 {
        return Ok(());
    }
    let mut words = Vec::with_capacity(params.len() * 2);
    for (_, v) in params {
        let h = tensor_hash(v.as_tensor())?;
        words.push(h as u32);
        words.push((h >> 32) as u32);
    }
    let n = params.len();
    let mine = Tensor::from_vec(words, (1, n * 2), &Device::Cpu)?;
    let all = dp.all_gather(&mine, 0)?.to_vec2::<u32>()?;
    let mut problems = Vec::new();
    for (r, row) in all.iter().enumerate().skip(1) {
        let differing: Vec<&str> = (0..n)
            .filter(|&i| row[2 * i..2 * i + 2] != all[0][2 * i..2 * i + 2])
            .map(|i| params[i].0.as_str())
            .collect();
        if !differing.is_empty() {
            let shown = differing.iter().take(3).copied().collect::<Vec<_>>().join(", ");
            let more = differing.len().saturating_sub(3);
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            let global = dp_members.get(r).copied().unwrap_or(r);
            let first = dp_members.first().copied().unwrap_or(0);
            problems.push(format!(
                "rank {global} (DP rank {r}) differs from rank {first} (DP rank 0) in {shown}{more}"
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "iteration {iteration}: weights differ across data-parallel replicas ({}): {}; \
             stopping (train.check_weight_hash_across_dp_replicas_interval)",
            dp.describe(),
            problems.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sees_one_ulp_and_shape() {
        let a = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, f32::from_bits(2.0f32.to_bits() + 1)], &Device::Cpu).unwrap();
        assert_ne!(tensor_hash(&a).unwrap(), tensor_hash(&b).unwrap());
        assert_ne!(tensor_hash(&a).unwrap(), tensor_hash(&a.reshape((2, 1)).unwrap()).unwrap());
        assert_eq!(tensor_hash(&a).unwrap(), tensor_hash(&a.copy().unwrap()).unwrap());
    }
}
