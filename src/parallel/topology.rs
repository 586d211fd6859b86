//! Megatron's rank layout: which global rank holds which (tp, cp, dp, pp) coordinates and the
//! member ranks of every process group, exactly as megatron-core's `RankGenerator` and
//! `generate_masked_orthogonal_rank_groups` produce them.
//!
//! The default order is `tp-cp-ep-dp-pp` (tp varies fastest); with
//! `dist.use_tp_pp_dp_mapping` it is `tp-cp-ep-pp-dp`. Expert parallelism is carved out of
//! dp by a separate generator in Megatron and has size 1 in the dense decoder layout used
//! here. Example from megatron-core's `initialize_model_parallel` docstring, 16 ranks, TP=2,
//! PP=4 (so DP=2):
//!
//! ```
//! use mbridge::parallel::{GroupKind, RankOrder, Topology};
//! let t = Topology::new(16, 2, 1, 4, RankOrder::TpCpDpPp).unwrap();
//! assert_eq!(t.groups(GroupKind::Tp)[1], vec![2, 3]);
//! assert_eq!(t.groups(GroupKind::Dp)[0], vec![0, 2]);
//! assert_eq!(t.groups(GroupKind::Pp)[0], vec![0, 4, 8, 12]);
//! assert_eq!(t.group_of(GroupKind::Embedding, 8), None);
//! assert_eq!(t.group_of(GroupKind::Embedding, 12), Some(vec![0, 12]));
//! ```

use crate::config::model::ModelConfig;
use crate::config::parallel::DistConfig;
use anyhow::{bail, Result};

/// Order of the parallel dimensions in the global rank, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankOrder {
    /// `tp-cp-ep-dp-pp`: Megatron's default.
    TpCpDpPp,
    /// `tp-cp-ep-pp-dp`: `use_tp_pp_dp_mapping = true`.
    TpCpPpDp,
}

/// A process group kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Tensor-parallel group.
    Tp,
    /// Context-parallel group.
    Cp,
    /// Data-parallel group (without cp).
    Dp,
    /// Data-parallel × context-parallel group (where gradients are reduced when cp > 1).
    DpCp,
    /// Pipeline-parallel group.
    Pp,
    /// Model-parallel group (tp × pp), e.g. for the gradient norm and NaN checks.
    Mp,
    /// Tensor × context parallel group.
    TpCp,
    /// First and last pipeline stage of each pipeline group (tied-embedding gradients); the
    /// single stage when pp = 1.
    Embedding,
}

impl GroupKind {
    /// Short name (used as the communicator's group name).
    pub fn name(self) -> &'static str {
        match self {
            Self::Tp => "tp",
            Self::Cp => "cp",
            Self::Dp => "dp",
            Self::DpCp => "dp-cp",
            Self::Pp => "pp",
            Self::Mp => "mp",
            Self::TpCp => "tp-cp",
            Self::Embedding => "embd",
        }
    }
}

/// Coordinates of one rank in the parallel grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankCoords {
    /// Tensor-parallel rank.
    pub tp: usize,
    /// Context-parallel rank.
    pub cp: usize,
    /// Data-parallel rank.
    pub dp: usize,
    /// Pipeline stage.
    pub pp: usize,
}

/// Dimension indices in [`Topology::dims`].
const TP: usize = 0;
const CP: usize = 1;
const DP: usize = 2;
const PP: usize = 3;

/// The parallel grid of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    world: usize,
    sizes: [usize; 4],
    order: RankOrder,
}

impl Topology {
    /// The grid of `world` ranks with the given tp, cp and pp sizes; dp is what remains.
    pub fn new(world: usize, tp: usize, cp: usize, pp: usize, order: RankOrder) -> Result<Self> {
        if world == 0 || tp == 0 || cp == 0 || pp == 0 {
            bail!("world size and parallel sizes must be > 0 (world {world}, tp {tp}, cp {cp}, pp {pp})");
        }
        let mp = tp * cp * pp;
        if !world.is_multiple_of(mp) {
            bail!(
                "world size {world} is not divisible by tensor ({tp}) × context ({cp}) × pipeline ({pp}) parallel size = {mp}"
            );
        }
        Ok(Self { world, sizes: [tp, cp, world / mp, pp], order })
    }

    /// The grid of `model.*` parallel sizes and `dist.use_tp_pp_dp_mapping` for `world` ranks.
    pub fn from_config(model: &ModelConfig, dist: &DistConfig, world: usize) -> Result<Self> {
        let order =
            if dist.use_tp_pp_dp_mapping { RankOrder::TpCpPpDp } else { RankOrder::TpCpDpPp };
        Self::new(
            world,
            model.tensor_model_parallel_size,
            model.context_parallel_size,
            model.pipeline_model_parallel_size,
            order,
        )
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// Tensor-parallel size.
    pub fn tp(&self) -> usize {
        self.sizes[TP]
    }
    /// Context-parallel size.
    pub fn cp(&self) -> usize {
        self.sizes[CP]
    }
    /// Data-parallel size.
    pub fn dp(&self) -> usize {
        self.sizes[DP]
    }
    /// Pipeline-parallel size.
    pub fn pp(&self) -> usize {
        self.sizes[PP]
    }
    /// The rank order.
    pub fn order(&self) -> RankOrder {
        self.order
    }

    /// Dimension indices, fastest first.
    fn dims(&self) -> [usize; 4] {
        match self.order {
            RankOrder::TpCpDpPp => [TP, CP, DP, PP],
            RankOrder::TpCpPpDp => [TP, CP, PP, DP],
        }
    }

    /// Stride of each dimension (indexed by TP/CP/DP/PP) in the global rank.
    fn strides(&self) -> [usize; 4] {
        let mut strides = [0; 4];
        let mut s = 1;
        for d in self.dims() {
            strides[d] = s;
            s *= self.sizes[d];
        }
        strides
    }

    /// Coordinates of global rank `rank`.
    pub fn coords(&self, rank: usize) -> Result<RankCoords> {
        if rank >= self.world {
            bail!("rank {rank} out of range for world size {}", self.world);
        }
        let st = self.strides();
        let c = |d: usize| (rank / st[d]) % self.sizes[d];
        Ok(RankCoords { tp: c(TP), cp: c(CP), dp: c(DP), pp: c(PP) })
    }

    /// Global rank of `coords`.
    pub fn rank_of(&self, coords: RankCoords) -> Result<usize> {
        let v = [coords.tp, coords.cp, coords.dp, coords.pp];
        if v.iter().zip(self.sizes).any(|(&c, s)| c >= s) {
            bail!(
                "coordinates {coords:?} out of range for sizes (tp, cp, dp, pp) = {:?}",
                self.sizes
            );
        }
        let st = self.strides();
        Ok((0..4).map(|d| v[d] * st[d]).sum())
    }

    /// Dimensions spanned by a group kind (Embedding spans pp, then keeps first + last).
    fn spanned(kind: GroupKind) -> &'static [usize] {
        match kind {
            GroupKind::Tp => &[TP],
            GroupKind::Cp => &[CP],
            GroupKind::Dp => &[DP],
            GroupKind::DpCp => &[CP, DP],
            GroupKind::Pp | GroupKind::Embedding => &[PP],
            GroupKind::Mp => &[TP, PP],
            GroupKind::TpCp => &[TP, CP],
        }
    }

    /// All groups of `kind`, each as global ranks in group-rank order, in Megatron's order
    /// (`generate_masked_orthogonal_rank_groups`: masked dims vary fastest-first inside a
    /// group, the remaining dims fastest-first across groups).
    pub fn groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let spanned = Self::spanned(kind);
        let st = self.strides();
        let order = self.dims();
        let masked: Vec<usize> = order.iter().copied().filter(|d| spanned.contains(d)).collect();
        let unmasked: Vec<usize> = order.iter().copied().filter(|d| !spanned.contains(d)).collect();
        let decompose = |mut i: usize, dims: &[usize]| -> usize {
            let mut offset = 0;
            for &d in dims {
                offset += (i % self.sizes[d]) * st[d];
                i /= self.sizes[d];
            }
            offset
        };
        let group_size: usize = masked.iter().map(|&d| self.sizes[d]).product();
        let num_groups = self.world / group_size;
        (0..num_groups)
            .map(|g| {
                let base = decompose(g, &unmasked);
                let ranks: Vec<usize> =
                    (0..group_size).map(|r| base + decompose(r, &masked)).collect();
                if kind == GroupKind::Embedding && ranks.len() > 1 {
                    vec![ranks[0], ranks[ranks.len() - 1]]
                } else {
                    ranks
                }
            })
            .collect()
    }

    /// The group of `kind` that contains `rank`; None when the rank is in none (only
    /// possible for [`GroupKind::Embedding`]: middle pipeline stages).
    pub fn group_of(&self, kind: GroupKind, rank: usize) -> Option<Vec<usize>> {
        self.groups(kind).into_iter().find(|g| g.contains(&rank))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coords_round_trip_in_both_orders() {
        for order in [RankOrder::TpCpDpPp, RankOrder::TpCpPpDp] {
            let t = Topology::new(24, 2, 3, 2, order).unwrap();
            assert_eq!(t.dp(), 2);
            for r in 0..24 {
                assert_eq!(t.rank_of(t.coords(r).unwrap()).unwrap(), r);
            }
        }
        assert!(Topology::new(12, 2, 1, 4, RankOrder::TpCpDpPp).is_err());
    }
}
