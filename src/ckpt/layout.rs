//! How a parameter is split over tensor-parallel ranks, and the conversions between a global
//! tensor and its per-rank shards (the basis of loading any TP layout into any other).

use anyhow::{bail, Result};

use crate::model::params::{self, ShardLayout, TpCoord};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Tensor-parallel partitioning of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "dim")]
pub enum Partition {
    /// Every rank holds the whole tensor (norms, row-parallel biases).
    Replicated,
    /// Contiguous slices along `dim` (column-parallel dim 0, row-parallel dim 1, vocab dim 0).
    Split(usize),
    /// Gated MLP `linear_fc1` = [gate; up] along dim 0: each rank holds [gate_r; up_r], so the
    /// global tensor is not the plain concatenation of rank shards.
    GatedSplit,
}

/// A parameter shard as one rank holds it.
#[derive(Debug, Clone)]
pub struct ShardedParam {
    pub name: String,
    pub tensor: Tensor,
    pub partition: Partition,
}

impl Partition {
    /// The partition of a model parameter with this TP partition dim and shard layout.
    pub fn from_param(partition_dim: Option<usize>, layout: ShardLayout) -> Self {
        match (partition_dim, layout) {
            (None, _) => Partition::Replicated,
            (Some(_), ShardLayout::GatedHalves) => Partition::GatedSplit,
            (Some(d), ShardLayout::Contiguous) => Partition::Split(d),
        }
    }

    /// The model's `(partition_dim, layout)` for this partition.
    pub fn to_param(self) -> (Option<usize>, ShardLayout) {
        match self {
            Partition::Replicated => (None, ShardLayout::Contiguous),
            Partition::Split(d) => (Some(d), ShardLayout::Contiguous),
            Partition::GatedSplit => (Some(0), ShardLayout::GatedHalves),
        }
    }
}

/// The slice of a global tensor that `rank` of `size` holds (the model's own slicing rule).
pub fn shard_of(global: &Tensor, partition: Partition, rank: usize, size: usize) -> Result<Tensor> {
    let (dim, layout) = partition.to_param();
    Ok(params::shard_of(global, dim, layout, TpCoord { rank, size })?)
}

/// The global tensor from all ranks' shards, in rank order.
pub fn assemble(shards: &[Tensor], partition: Partition) -> Result<Tensor> {
    if shards.is_empty() {
        bail!("no shards to assemble");
    }
    match partition {
        Partition::Replicated => Ok(shards[0].clone()),
        Partition::Split(dim) => Ok(Tensor::cat(shards, dim)?),
        Partition::GatedSplit => {
            let mut gates = Vec::new();
            let mut ups = Vec::new();
            for s in shards {
                let half = s.dim(0)? / 2;
                gates.push(s.narrow(0, 0, half)?);
                ups.push(s.narrow(0, half, half)?);
            }
            gates.extend(ups);
            Ok(Tensor::cat(&gates, 0)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shards_reassemble_for_every_partition() {
        let g = Tensor::arange(0f32, 48., &Device::Cpu).unwrap().reshape((8, 6)).unwrap();
        for p in
            [Partition::Replicated, Partition::Split(0), Partition::Split(1), Partition::GatedSplit]
        {
            let shards: Vec<Tensor> = (0..2).map(|r| shard_of(&g, p, r, 2).unwrap()).collect();
            let back = assemble(&shards, p).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), g.to_vec2::<f32>().unwrap(), "{p:?}");
        }
        // Gated: rank 0 holds gate rows 0-1 and up rows 4-5.
        let s0 = shard_of(&g, Partition::GatedSplit, 0, 2).unwrap();
        assert_eq!(s0.get(2).unwrap().to_vec1::<f32>().unwrap()[0], 24.0);
        assert!(shard_of(&g, Partition::Split(1), 0, 4).is_err());
    }
}
