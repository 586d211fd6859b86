//! Context parallelism on the in-process CPU backend: every sequence split over CP ranks
//! (chunks r and 2·CP−1−r, keys and values gathered) trains like one process, alone and
//! combined with tensor (+ sequence), pipeline and data parallelism, and its checkpoints
//! load at CP=1.

mod train_common;

use train_common::{tiny_config, train_ranks};

use candle_core::Device;
use mbridge::config::finalize;
use mbridge::train::trainer::{TrainOutcome, Trainer};

const ITERS: usize = 20;

fn config(extra: &[&str]) -> (mbridge::config::LoadedConfig, String) {
    let iters = format!("train.train_iters={ITERS}");
    // MBS 2 so that GBS 8 splits over DP 2 and PP 2 has several micro-batches.
    let base =
        [iters.as_str(), "validation.eval_iters=0", "rng.seed=7", "train.micro_batch_size=2"];
    tiny_config(&[&base[..], extra].concat())
}

fn try_run_ranks(world: usize, extra: &[&str]) -> anyhow::Result<Vec<TrainOutcome>> {
    let (loaded, toml) = config(extra);
    train_ranks(world, &loaded, &toml)
}

fn run_ranks(world: usize, extra: &[&str]) -> Vec<TrainOutcome> {
    try_run_ranks(world, extra).unwrap()
}

fn single(extra: &[&str]) -> TrainOutcome {
    let (loaded, toml) = config(extra);
    let fin = finalize(loaded.cfg, None, None).unwrap();
    Trainer::new(fin, toml, Device::Cpu).unwrap().train().unwrap()
}

fn rel(x: f64, y: f64) -> f64 {
    (x - y).abs() / x.abs().max(1e-12)
}

/// Same losses (relative 1e-5) and gradient norms (1e-4) at every iteration, on every rank.
fn assert_same_curve(want: &TrainOutcome, got: &[TrainOutcome], what: &str) {
    for (rank, g) in got.iter().enumerate() {
        assert_eq!(want.losses.len(), g.losses.len(), "{what} rank {rank}");
        for ((it, x), (_, y)) in want.losses.iter().zip(&g.losses) {
            assert!(rel(*x, *y) <= 1e-5, "{what} rank {rank} iteration {it}: loss {x} vs {y}");
        }
        for ((it, x), (_, y)) in want.grad_norms.iter().zip(&g.grad_norms) {
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!(rel(x, y) <= 1e-4, "{what} rank {rank} iteration {it}: grad norm {x} vs {y}");
        }
    }
}

#[test]
fn cp2_alone_and_with_tp_sp_dp_zero1_and_pp_match_one_process() {
    let base = single(&[]);
    assert!(base.losses.last().unwrap().1 < base.losses[0].1 * 0.8, "the run learns");
    let cp = "model.context_parallel_size=2";
    assert_same_curve(&base, &run_ranks(2, &[cp]), "CP=2");
    let tp_sp = ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"];
    assert_same_curve(&base, &run_ranks(4, &[cp, tp_sp[0], tp_sp[1]]), "CP=2 × TP=2 (SP)");
    let zero1 = "ddp.use_distributed_optimizer=true";
    assert_same_curve(&base, &run_ranks(4, &[cp, zero1]), "CP=2 × DP=2 (distributed optimizer)");
    let pp = "model.pipeline_model_parallel_size=2";
    assert_same_curve(&base, &run_ranks(4, &[cp, pp]), "CP=2 × PP=2");
}

/// EOD-masked losses leave the CP ranks different numbers of loss tokens; the mean still
/// divides by the whole micro-batch's count, in both normalizations.
#[test]
fn uneven_loss_masks_over_cp_ranks_match_one_process() {
    for per_token in ["false", "true"] {
        let extra = [
            "dataset.eod_mask_loss=true",
            "model.context_parallel_size=4",
            &format!("model.calculate_per_token_loss={per_token}"),
        ];
        let base = single(&[extra[0], extra[2]]);
        let cp = run_ranks(4, &extra);
        assert_same_curve(&base, &cp, &format!("CP=4, per-token loss {per_token}"));
    }
}

#[test]
fn checkpoint_saved_with_cp2_resumes_with_cp1_and_validates_alike() {
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().display());
    let load = format!("+checkpoint.load={}", dir.path().display());
    let eval = ["validation.eval_iters=2", "validation.eval_interval=5"];
    let full = single(&[eval[0], eval[1]]);
    let cp = "model.context_parallel_size=2";
    let first = run_ranks(2, &[cp, eval[0], eval[1], "+train.exit_interval=10", &save]);
    assert_eq!(first[0].final_step, 10);
    let want = full.losses[..10].to_vec();
    assert_same_curve(&TrainOutcome { losses: want, ..full.clone() }, &first, "CP=2 first half");
    let resumed = single(&[eval[0], eval[1], &save, &load]);
    assert_eq!(resumed.losses[0].0, 11);
    let tail = TrainOutcome {
        losses: full.losses[10..].to_vec(),
        grad_norms: full.grad_norms[10..].to_vec(),
        ..full.clone()
    };
    assert_same_curve(&tail, std::slice::from_ref(&resumed), "CP=2 checkpoint resumed at CP=1");
    let (want, got) = (full.last_validation_loss.unwrap(), resumed.last_validation_loss.unwrap());
    assert!(rel(want, got) <= 1e-5, "validation loss {want} vs {got}");
}

#[test]
fn sequence_length_must_split_into_two_chunks_per_cp_rank() {
    let e = try_run_ranks(3, &["model.context_parallel_size=3", "model.seq_length=63"])
        .map(|_| ())
        .unwrap_err();
    assert!(format!("{e:#}").contains("divisible by 2 × `model.context_parallel_size`"), "{e:#}");
}

/// Full recompute runs the layers' forward again in backward, key/value gathers included.
#[test]
fn cp2_with_full_recompute_matches_one_process() {
    let recompute = [
        "model.recompute_granularity=\"full\"",
        "model.recompute_method=\"uniform\"",
        "model.recompute_num_layers=1",
    ];
    let base = single(&recompute);
    let cp2 = ["model.context_parallel_size=2", "model.cp_comm_type=\"all_gather\""];
    let cp = run_ranks(2, &[&recompute[..], &cp2[..]].concat());
    assert_same_curve(&base, &cp, "CP=2 with full recompute");
}

/// Selective recompute runs the layers' written-out backward: keys and values are gathered
/// outside autograd and their gradients reduce-scattered by hand, kept (`mlp`) or recomputed
/// (`core_attn`) core attention alike.
#[test]
fn cp2_with_the_written_out_layer_backward_matches_one_process() {
    let base = single(&[]);
    for modules in ["[\"mlp\"]", "[\"core_attn\"]"] {
        let modules = format!("model.recompute_modules={modules}");
        let extra = [
            "model.recompute_granularity=\"selective\"",
            &modules,
            "model.context_parallel_size=2",
        ];
        assert_same_curve(&base, &run_ranks(2, &extra), &format!("CP=2, selective {modules}"));
    }
}
