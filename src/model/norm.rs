//! Norm layers (RMSNorm / LayerNorm) bound to their registered parameters.

use super::arch::GptArch;
use super::init::Init;
use super::params::{ParamStore, ShardLayout};
use crate::config::model::Normalization;
use crate::ops;
use anyhow::Result;
use candle_core::Tensor;

/// A norm over the last dimension with its weight (and bias for LayerNorm).
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    kind: Normalization,
    eps: f64,
    zero_centered: bool,
}

impl Norm {
    /// Registers `{weight_name}` (and `{bias_name}` for LayerNorm) of width `dim`.
    /// Weights start at one, or zero with zero-centered gamma (then gamma = 1 + w).
    pub fn new(
        store: &mut ParamStore,
        arch: &GptArch,
        weight_name: &str,
        bias_name: &str,
        dim: usize,
    ) -> Result<Self> {
        let w_init = if arch.zero_centered_gamma { Init::Zeros } else { Init::Ones };
        let weight = store.create(weight_name, &[dim], None, ShardLayout::Contiguous, w_init)?;
        let bias = match arch.normalization {
            Normalization::LayerNorm => {
                Some(store.create(bias_name, &[dim], None, ShardLayout::Contiguous, Init::Zeros)?)
            }
            Normalization::RMSNorm => None,
        };
        Ok(Self {
            weight,
            bias,
            kind: arch.normalization,
            eps: arch.eps,
            zero_centered: arch.zero_centered_gamma,
        })
    }

    /// Normalizes `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match (&self.kind, &self.bias) {
            (Normalization::LayerNorm, Some(b)) => {
                ops::layer_norm(x, &self.weight, b, self.eps, self.zero_centered)?
            }
            _ => ops::rms_norm(x, &self.weight, self.eps, self.zero_centered)?,
        })
    }
}
