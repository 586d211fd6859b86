//! Pipeline parallelism as megatron-core does it: layers per model chunk, and the op order of
//! the schedules. Expected orders were produced by
//! megatron-core's own `get_schedule_table` and the warm-up / steady / cool-down loops of
//! `megatron/core/pipeline_parallel/schedules.py` (forward before backward in each steady
//! step), written as `F<chunk>.<microbatch>` / `B<chunk>.<microbatch>`.

use mbridge::config::model::ModelConfig;
use mbridge::model::{chunk_layers, stage_layers};
use mbridge::parallel::pipeline::schedule::schedule_table;
use mbridge::parallel::pipeline::{schedule, Op, ScheduleSpec};

fn render(ops: &[Op]) -> String {
    ops.iter()
        .map(|op| match op {
            Op::Forward { chunk, microbatch } => format!("F{chunk}.{microbatch}"),
            Op::Backward { chunk, microbatch } => format!("B{chunk}.{microbatch}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn spec(pp: usize, rank: usize, m: usize, vp: usize, group: usize) -> ScheduleSpec {
    ScheduleSpec {
        pp_size: pp,
        pp_rank: rank,
        num_microbatches: m,
        num_chunks: vp,
        microbatch_group_size: group,
        forward_only: false,
    }
}

#[test]
fn one_f_one_b_matches_megatron_core() {
    let want = [
        "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 B0.3 B0.4 B0.5",
        "F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 F0.4 B0.2 F0.5 B0.3 B0.4 B0.5",
        "F0.0 F0.1 B0.0 F0.2 B0.1 F0.3 B0.2 F0.4 B0.3 F0.5 B0.4 B0.5",
        "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3 F0.4 B0.4 F0.5 B0.5",
    ];
    for (rank, want) in want.iter().enumerate() {
        assert_eq!(render(&schedule(&spec(4, rank, 6, 1, 4)).unwrap()), *want, "rank {rank}");
    }
    // Fewer micro-batches than stages: warm-up is capped.
    assert_eq!(render(&schedule(&spec(2, 0, 1, 1, 2)).unwrap()), "F0.0 B0.0");
}

#[test]
fn interleaved_matches_megatron_core() {
    let cases: [(usize, usize, usize, usize, &[&str]); 3] = [
        (2, 2, 4, 2, &[
            "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3",
            "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3",
        ]),
        (2, 3, 5, 3, &[
            "F0.0 F0.1 F0.2 F1.0 F1.1 F1.2 F2.0 F2.1 F2.2 B2.0 F0.3 B2.1 F0.4 B2.2 F1.3 B1.0 F1.4 B1.1 F2.3 B1.2 F2.4 B0.0 B0.1 B0.2 B2.3 B2.4 B1.3 B1.4 B0.3 B0.4",
            "F0.0 F0.1 F0.2 F1.0 F1.1 F1.2 F2.0 B2.0 F2.1 B2.1 F2.2 B2.2 F0.3 B1.0 F0.4 B1.1 F1.3 B1.2 F1.4 B0.0 F2.3 B0.1 F2.4 B0.2 B2.3 B2.4 B1.3 B1.4 B0.3 B0.4",
        ]),
        (4, 2, 8, 4, &[
            "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 F0.4 F0.5 F0.6 B1.0 F0.7 B1.1 F1.4 B1.2 F1.5 B1.3 F1.6 B0.0 F1.7 B0.1 B0.2 B0.3 B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 B0.6 B0.7",
            "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 F0.4 B1.0 F0.5 B1.1 F0.6 B1.2 F0.7 B1.3 F1.4 B0.0 F1.5 B0.1 F1.6 B0.2 F1.7 B0.3 B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 B0.6 B0.7",
            "F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 B1.0 F1.3 B1.1 F0.4 B1.2 F0.5 B1.3 F0.6 B0.0 F0.7 B0.1 F1.4 B0.2 F1.5 B0.3 F1.6 B1.4 F1.7 B1.5 B1.6 B1.7 B0.4 B0.5 B0.6 B0.7",
            "F0.0 F0.1 F0.2 F0.3 F1.0 B1.0 F1.1 B1.1 F1.2 B1.2 F1.3 B1.3 F0.4 B0.0 F0.5 B0.1 F0.6 B0.2 F0.7 B0.3 F1.4 B1.4 F1.5 B1.5 F1.6 B1.6 F1.7 B1.7 B0.4 B0.5 B0.6 B0.7",
        ]),
    ];
    for (pp, vp, m, group, want) in cases {
        for (rank, want) in want.iter().enumerate() {
            let got = render(&schedule(&spec(pp, rank, m, vp, group)).unwrap());
            assert_eq!(got, *want, "PP={pp} VP={vp} M={m} group={group} rank {rank}");
        }
    }
}

#[test]
fn schedule_table_matches_the_megatron_core_docstring() {
    // "PP2 N3M5 with VP2": micro-batch 0 1 2 0 1 2 3 4 3 4, chunk 0 0 0 1 1 1 0 0 1 1.
    let (mb, chunk): (Vec<usize>, Vec<usize>) = schedule_table(5, 2, 3).into_iter().unzip();
    assert_eq!(mb, [0, 1, 2, 0, 1, 2, 3, 4, 3, 4]);
    assert_eq!(chunk, [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]);
}

#[test]
fn forward_only_runs_every_forward_in_table_order() {
    let mut s = spec(2, 1, 4, 2, 2);
    s.forward_only = true;
    assert_eq!(render(&schedule(&s).unwrap()), "F0.0 F0.1 F1.0 F1.1 F0.2 F0.3 F1.2 F1.3");
    s.num_chunks = 1;
    assert_eq!(render(&schedule(&s).unwrap()), "F0.0 F0.1 F0.2 F0.3");
}

#[test]
fn every_pass_runs_once_and_backward_follows_its_forward() {
    for (pp, vp, m, group) in [(2, 1, 5, 2), (4, 1, 3, 4), (2, 2, 6, 2), (4, 2, 8, 4), (3, 2, 7, 4)]
    {
        for rank in 0..pp {
            let ops = schedule(&spec(pp, rank, m, vp, group)).unwrap();
            assert_eq!(ops.len(), 2 * m * vp);
            for (i, op) in ops.iter().enumerate() {
                if let Op::Backward { chunk, microbatch } = *op {
                    let f = ops.iter().position(|o| *o == Op::Forward { chunk, microbatch });
                    assert!(f.is_some_and(|f| f < i), "{op:?} before its forward");
                }
            }
        }
    }
}

#[test]
fn bad_microbatch_groups_are_refused_with_the_field_name() {
    let e = schedule(&spec(2, 0, 4, 2, 1)).unwrap_err().to_string();
    assert!(e.contains("microbatch_group_size_per_vp_stage"), "{e}");
    let e = schedule(&spec(4, 0, 5, 2, 4)).unwrap_err().to_string();
    assert!(e.contains("modulo"), "{e}");
}

fn layers(cfg: &ModelConfig, pp: usize, vp: usize) -> Vec<Vec<Vec<usize>>> {
    (0..pp).map(|r| (0..vp).map(|c| chunk_layers(cfg, r, pp, c).unwrap()).collect()).collect()
}

#[test]
fn model_chunks_hold_megatron_cores_layers() {
    let cfg = |n: usize| ModelConfig { num_layers: n, ..Default::default() };
    // get_num_layers_to_build's docstring: 8 layers, 2 stages, 2 (then 4) model chunks.
    let mut c = cfg(8);
    c.virtual_pipeline_model_parallel_size = Some(2);
    assert_eq!(layers(&c, 2, 2), [[vec![0, 1], vec![4, 5]], [vec![2, 3], vec![6, 7]]]);
    assert_eq!(stage_layers(&c, 1, 2).unwrap(), [2, 3, 6, 7]);
    c.virtual_pipeline_model_parallel_size = Some(4);
    assert_eq!(
        layers(&c, 2, 4),
        [[[0], [2], [4], [6]], [[1], [3], [5], [7]]].map(|r| r.map(|l| l.to_vec()).to_vec())
    );
    // Embedding and loss counted as layers: 6 + 2 over 4 stages.
    let mut c = cfg(6);
    c.account_for_embedding_in_pipeline_split = true;
    c.account_for_loss_in_pipeline_split = true;
    assert_eq!(layers(&c, 4, 1), [[vec![0]], [vec![1, 2]], [vec![3, 4]], [vec![5]]]);
    // Uneven: 1 + 3 + 3 + 3 layers.
    let mut c = cfg(10);
    c.num_layers_in_first_pipeline_stage = Some(1);
    c.num_layers_in_last_pipeline_stage = Some(3);
    assert_eq!(layers(&c, 4, 1), [[vec![0]], [vec![1, 2, 3]], [vec![4, 5, 6]], [vec![7, 8, 9]]]);
    // Uneven with virtual stages: 2 + 8 + 2 layers, 2 chunks per rank.
    let mut c = cfg(12);
    c.num_layers_in_first_pipeline_stage = Some(2);
    c.num_layers_in_last_pipeline_stage = Some(2);
    c.virtual_pipeline_model_parallel_size = Some(2);
    assert_eq!(
        layers(&c, 3, 2),
        [[vec![0], vec![6]], [vec![1, 2, 3, 4], vec![7, 8, 9, 10]], [vec![5], vec![11]],]
    );
    // megatron-core refuses uneven stages with the embedding/loss accounting.
    c.account_for_loss_in_pipeline_split = true;
    let e = chunk_layers(&c, 0, 3, 0).unwrap_err().to_string();
    assert!(e.contains("account_for_embedding/loss_in_pipeline_split"), "{e}");
}
