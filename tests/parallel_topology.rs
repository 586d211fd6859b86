//! Megatron rank order and process groups, checked against megatron-core's documented layouts.

use mbridge::config::model::ModelConfig;
use mbridge::config::parallel::DistConfig;
use mbridge::parallel::{GroupKind, RankCoords, RankOrder, Topology};

/// `initialize_model_parallel` docstring: 16 GPUs, TP=2, PP=4 ⇒ DP=2.
#[test]
fn megatron_docstring_tp2_pp4() {
    let t = Topology::new(16, 2, 1, 4, RankOrder::TpCpDpPp).unwrap();
    assert_eq!(t.dp(), 2);
    assert_eq!(
        t.groups(GroupKind::Dp),
        vec![
            vec![0, 2],
            vec![1, 3],
            vec![4, 6],
            vec![5, 7],
            vec![8, 10],
            vec![9, 11],
            vec![12, 14],
            vec![13, 15]
        ]
    );
    let tp: Vec<Vec<usize>> = (0..8).map(|i| vec![2 * i, 2 * i + 1]).collect();
    assert_eq!(t.groups(GroupKind::Tp), tp);
    assert_eq!(
        t.groups(GroupKind::Pp),
        vec![vec![0, 4, 8, 12], vec![1, 5, 9, 13], vec![2, 6, 10, 14], vec![3, 7, 11, 15]]
    );
    assert_eq!(
        t.groups(GroupKind::Mp),
        vec![vec![0, 1, 4, 5, 8, 9, 12, 13], vec![2, 3, 6, 7, 10, 11, 14, 15]]
    );
    assert_eq!(
        t.groups(GroupKind::Embedding),
        vec![vec![0, 12], vec![1, 13], vec![2, 14], vec![3, 15]]
    );
    assert_eq!(t.coords(7).unwrap(), RankCoords { tp: 1, cp: 0, dp: 1, pp: 1 });
    assert_eq!(t.group_of(GroupKind::Embedding, 5), None, "middle stage");
    assert_eq!(t.group_of(GroupKind::Dp, 9), Some(vec![9, 11]));
}

/// Context parallelism sits between tp and dp: 8 ranks, TP=2, CP=2 ⇒ DP=2.
#[test]
fn context_parallel_groups() {
    let t = Topology::new(8, 2, 2, 1, RankOrder::TpCpDpPp).unwrap();
    assert_eq!(t.groups(GroupKind::Cp), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
    assert_eq!(t.groups(GroupKind::Dp), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
    assert_eq!(t.groups(GroupKind::DpCp), vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
    assert_eq!(t.groups(GroupKind::TpCp), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    // PP = 1: the embedding group is the single stage.
    assert_eq!(t.group_of(GroupKind::Embedding, 6), Some(vec![6]));
}

/// `use_tp_pp_dp_mapping`: order tp-cp-ep-pp-dp, so pipeline neighbours are close.
#[test]
fn tp_pp_dp_mapping() {
    let dist = DistConfig { use_tp_pp_dp_mapping: true, ..Default::default() };
    let model = ModelConfig {
        tensor_model_parallel_size: 2,
        pipeline_model_parallel_size: 4,
        ..Default::default()
    };
    let t = Topology::from_config(&model, &dist, 16).unwrap();
    assert_eq!(t.order(), RankOrder::TpCpPpDp);
    assert_eq!(
        t.groups(GroupKind::Pp),
        vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7], vec![8, 10, 12, 14], vec![9, 11, 13, 15]]
    );
    assert_eq!(t.groups(GroupKind::Dp)[0], vec![0, 8]);
    assert_eq!(t.groups(GroupKind::Dp)[3], vec![3, 11]);
    assert_eq!(t.groups(GroupKind::Tp)[1], vec![2, 3]);
    assert_eq!(t.groups(GroupKind::Embedding)[0], vec![0, 6]);
    assert_eq!(t.coords(11).unwrap(), RankCoords { tp: 1, cp: 0, dp: 1, pp: 1 });
}

/// Every kind partitions the world, and every rank's groups agree with its coordinates.
#[test]
fn groups_partition_the_world() {
    for order in [RankOrder::TpCpDpPp, RankOrder::TpCpPpDp] {
        let t = Topology::new(24, 2, 2, 3, order).unwrap();
        for kind in [
            GroupKind::Tp,
            GroupKind::Cp,
            GroupKind::Dp,
            GroupKind::DpCp,
            GroupKind::Pp,
            GroupKind::Mp,
            GroupKind::TpCp,
        ] {
            let mut all: Vec<usize> = t.groups(kind).concat();
            all.sort_unstable();
            assert_eq!(all, (0..24).collect::<Vec<_>>(), "{kind:?}");
        }
        for r in 0..24 {
            let c = t.coords(r).unwrap();
            let tp = t.group_of(GroupKind::Tp, r).unwrap();
            assert_eq!(tp[c.tp], r);
            assert!(tp.iter().all(|&m| {
                let o = t.coords(m).unwrap();
                (o.cp, o.dp, o.pp) == (c.cp, c.dp, c.pp)
            }));
            let pp = t.group_of(GroupKind::Pp, r).unwrap();
            assert_eq!(pp[c.pp], r);
        }
    }
    let err = Topology::new(12, 2, 1, 4, RankOrder::TpCpDpPp).unwrap_err().to_string();
    assert!(err.contains("not divisible"), "{err}");
}
