//! How a parameter is split over tensor-parallel ranks, and the conversions between a global
//! tensor and its per-rank shards (the basis of loading any TP layout into any other).

use anyhow::{bail, Result};
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

/// The slice of a global tensor that `rank` of `size` holds.
pub fn shard_of(global: &Tensor, partition: Partition, rank: usize, size: usize) -> Result<Tensor> {
    match partition {
        Partition::Replicated => Ok(global.clone()),
        Partition::Split(dim) => {
            let n = global.dim(dim)?;
            if n % size != 0 {
                bail!("dimension {dim} of size {n} does not split over {size} ranks");
            }
            Ok(global.narrow(dim, rank * (n / size), n / size)?)
        }
        Partition::GatedSplit => {
            let n = global.dim(0)?;
            if n % (2 * size) != 0 {
                bail!("gated dimension of size {n} does not split over {size} ranks");
            }
            let half = n / 2;
            let part = half / size;
            let gate = global.narrow(0, rank * part, part)?;
            let up = global.narrow(0, half + rank * part, part)?;
            Ok(Tensor::cat(&[&gate, &up], 0)?)
        }
    }
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
