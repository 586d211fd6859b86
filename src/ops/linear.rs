//! `y = x Wᵀ + b` for torch-layout weights `[out, in]` and inputs of any rank.

use candle_core::{Result, Tensor, D};

/// Applies a linear layer to `x` `[..., in]`; `weight` is `[out, in]` (no transposes are
/// stored anywhere, as in torch and safetensors), `bias` `[out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_f = x.dim(D::Minus1)?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_f))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = weight.dim(0)?;
    y.reshape(out)
}
