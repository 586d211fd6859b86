//! `mbridge env`: what the launcher environment says about this process, and (given the
//! parallel sizes) its coordinates and process groups in Megatron's rank order.

use crate::parallel::launch::discover_from_process_env;
use crate::parallel::{GroupKind, RankOrder, Topology};
use std::fmt::Write;

/// Arguments of `mbridge env`.
#[derive(Debug, clap::Args)]
pub struct EnvArgs {
    /// Tensor-parallel size, to show this rank's coordinates and groups.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline-parallel size.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Context-parallel size.
    #[arg(long, default_value_t = 1)]
    pub cp: usize,
    /// Use the tp-cp-ep-pp-dp rank order (`dist.use_tp_pp_dp_mapping`).
    #[arg(long)]
    pub tp_pp_dp_mapping: bool,
}

/// Prints the discovered launcher, ranks and master, then the groups of this rank.
pub fn run(args: EnvArgs) -> anyhow::Result<()> {
    let d = discover_from_process_env()?;
    let mut s = String::new();
    let node = d.node_rank.map_or("unknown".to_string(), |n| n.to_string());
    writeln!(s, "launcher: {}", d.launcher.name())?;
    writeln!(s, "rank: {}", d.rank)?;
    writeln!(s, "world_size: {}", d.world_size)?;
    writeln!(s, "local_rank: {}", d.local_rank)?;
    writeln!(s, "local_world_size: {}", d.local_world_size)?;
    writeln!(s, "node_rank: {node}")?;
    writeln!(s, "master_addr: {}", d.master_addr)?;
    writeln!(s, "master_port: {}", d.master_port)?;
    let order = if args.tp_pp_dp_mapping { RankOrder::TpCpPpDp } else { RankOrder::TpCpDpPp };
    let t = Topology::new(d.world_size, args.tp, args.cp, args.pp, order)?;
    let c = t.coords(d.rank)?;
    writeln!(s, "sizes: tp={} cp={} dp={} pp={}", t.tp(), t.cp(), t.dp(), t.pp())?;
    writeln!(s, "coords: tp={} cp={} dp={} pp={}", c.tp, c.cp, c.dp, c.pp)?;
    for kind in [
        GroupKind::Tp,
        GroupKind::Cp,
        GroupKind::Dp,
        GroupKind::DpCp,
        GroupKind::Pp,
        GroupKind::Mp,
        GroupKind::Embedding,
    ] {
        match t.group_of(kind, d.rank) {
            Some(g) => writeln!(s, "{} group: {g:?}", kind.name())?,
            None => writeln!(s, "{} group: none", kind.name())?,
        }
    }
    super::out(&s);
    Ok(())
}
