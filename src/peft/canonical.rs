//! Canonical LoRA (Megatron Bridge's `CanonicalLoRA`): the fused `linear_qkv` and gated
//! `linear_fc1` get one adapter per Hugging Face projection (`adapter_q`, `adapter_k`,
//! `adapter_v`; `adapter_gate`, `adapter_up`), so every adapter maps onto one HF PEFT module
//! as it is. Their outputs are assembled into the fused layer's output layout: per query
//! group its query heads, then one key and one value head; `[gate; up]` for `linear_fc1`.

use crate::config::peft::{PeftConfig, PeftScheme};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Canonical LoRA targets the parts, never the fused layers (as Megatron Bridge asserts).
pub fn check_targets(cfg: &PeftConfig) -> Result<()> {
    if cfg.peft_scheme != PeftScheme::CanonicalLora {
        return Ok(());
    }
    let fused = |t: &&String| t.ends_with("linear_qkv") || t.ends_with("linear_fc1");
    if let Some(t) = cfg.target_modules.iter().find(fused) {
        bail!("canonical LoRA adapts the parts of `{t}` separately: target linear_q / linear_k / linear_v and linear_fc1_up / linear_fc1_gate instead, or use peft_scheme = \"lora\"");
    }
    Ok(())
}

/// How a fused column-parallel output is made of the parts canonical LoRA adapts separately
/// (global sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `linear_qkv`.
    Qkv { heads: usize, groups: usize, head_dim: usize },
    /// Gated `linear_fc1`.
    GateUp { ffn: usize },
}

impl Split {
    /// `(adapter key, canonical target name)` of every part, in Megatron Bridge's names.
    pub fn parts(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Split::Qkv { .. } => {
                &[("adapter_q", "linear_q"), ("adapter_k", "linear_k"), ("adapter_v", "linear_v")]
            }
            Split::GateUp { .. } => {
                &[("adapter_gate", "linear_fc1_gate"), ("adapter_up", "linear_fc1_up")]
            }
        }
    }

    /// Output rows of each part (global), in [`Self::parts`] order.
    pub fn part_rows(&self) -> Vec<usize> {
        match *self {
            Split::Qkv { heads, groups, head_dim } => {
                vec![heads * head_dim, groups * head_dim, groups * head_dim]
            }
            Split::GateUp { ffn } => vec![ffn, ffn],
        }
    }

    /// The fused output (last dim) from every part's output `[..., rows_p / tp]` (this rank's
    /// contiguous shard of the part, as Megatron splits a column-parallel adapter's B); a
    /// part that is not adapted is `None` (zeros).
    pub fn assemble(&self, parts: &[Option<Tensor>], tp: usize) -> Result<Tensor> {
        let Some(like) = parts.iter().flatten().next() else {
            bail!("canonical LoRA: no adapted part to assemble");
        };
        let lead = &like.dims()[..like.rank() - 1];
        let (dtype, device) = (like.dtype(), like.device().clone());
        let full: Vec<Tensor> = parts
            .iter()
            .zip(self.part_rows())
            .map(|(p, rows)| match p {
                Some(t) => Ok(t.clone()),
                None => zeros(lead, rows / tp, dtype, &device),
            })
            .collect::<Result<_>>()?;
        let last = lead.len();
        Ok(match *self {
            Split::Qkv { heads, groups, head_dim: d } => {
                let (g, hpg) = (groups / tp, heads / groups);
                let group_view = |t: &Tensor, per_group: usize| -> Result<Tensor> {
                    let mut shape = lead.to_vec();
                    shape.extend([g, per_group * d]);
                    Ok(t.reshape(shape)?)
                };
                let grouped = [
                    group_view(&full[0], hpg)?,
                    group_view(&full[1], 1)?,
                    group_view(&full[2], 1)?,
                ];
                let mut shape = lead.to_vec();
                shape.push(g * (hpg + 2) * d);
                Tensor::cat(&grouped, last + 1)?.reshape(shape)?
            }
            Split::GateUp { .. } => Tensor::cat(&full, last)?,
        })
    }
}

fn zeros(lead: &[usize], cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut shape = lead.to_vec();
    shape.push(cols);
    Ok(Tensor::zeros(shape, dtype, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row `r` of the fused QKV output holds group r / ((hpg+2)·d): its query heads, then k,
    /// then v — checked against column indices written by hand.
    #[test]
    fn qkv_parts_interleave_per_query_group() {
        let dev = Device::Cpu;
        let split = Split::Qkv { heads: 4, groups: 2, head_dim: 1 };
        let col = |v: &[f32]| Tensor::new(v, &dev).unwrap().unsqueeze(0).unwrap();
        let q = col(&[10., 11., 12., 13.]);
        let (k, v) = (col(&[20., 21.]), col(&[30., 31.]));
        let fused = split.assemble(&[Some(q.clone()), Some(k), Some(v)], 1).unwrap();
        let got: Vec<f32> = fused.squeeze(0).unwrap().to_vec1().unwrap();
        assert_eq!(got, [10., 11., 20., 30., 12., 13., 21., 31.]);
        // TP=2: each rank holds one group; a missing part is zeros.
        let q0 = col(&[10., 11.]);
        let got: Vec<f32> = split
            .assemble(&[Some(q0), None, None], 2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, [10., 11., 0., 0.]);
        let gu = Split::GateUp { ffn: 2 };
        let got: Vec<f32> = gu
            .assemble(&[None, Some(col(&[5., 6.]))], 1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, [0., 0., 5., 6.]);
    }
}
