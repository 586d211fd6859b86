//! Data parallelism on the in-process CPU backend: bucketed DDP and the distributed optimizer
//! (ZeRO-1) train like one process, their checkpoints load into any DP size and optimizer,
//! and the replica weight check names a diverged rank.

mod train_common;

use train_common::tiny_config;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use mbridge::config::finalize;
use mbridge::parallel::comm::LocalWorld;
use mbridge::parallel::{ProcessGroups, Topology};
use mbridge::train::trainer::{TrainOutcome, Trainer};

const ITERS: usize = 20;

fn config(extra: &[&str]) -> (mbridge::config::LoadedConfig, String) {
    let iters = format!("train.train_iters={ITERS}");
    // MBS 2 so that GBS 8 splits over DP 4 too.
    let base =
        [iters.as_str(), "validation.eval_iters=0", "rng.seed=11", "train.micro_batch_size=2"];
    tiny_config(&[&base[..], extra].concat())
}

fn try_run_ranks(
    world: usize,
    extra: &[&str],
    before: impl Fn(usize, &Trainer) + Sync,
) -> anyhow::Result<Vec<TrainOutcome>> {
    let (loaded, toml) = config(extra);
    LocalWorld::run(world, Duration::from_secs(120), |rank, lw| {
        let fin = finalize(loaded.cfg.clone(), Some(world), None)?;
        let topo = Topology::from_config(&fin.cfg.model, &fin.cfg.dist, world)?;
        let groups = ProcessGroups::local(lw, topo, rank)?;
        let mut t = Trainer::new_rank(fin, toml.clone(), Device::Cpu, Some(groups))?;
        before(rank, &t);
        t.train()
    })
}

fn run_ranks(world: usize, extra: &[&str]) -> Vec<TrainOutcome> {
    try_run_ranks(world, extra, |_, _| {}).unwrap()
}

fn single(extra: &[&str]) -> TrainOutcome {
    let (loaded, toml) = config(extra);
    let fin = finalize(loaded.cfg, None, None).unwrap();
    Trainer::new(fin, toml, Device::Cpu).unwrap().train().unwrap()
}

fn rel(x: f64, y: f64) -> f64 {
    (x - y).abs() / x.abs().max(1e-12)
}

fn assert_same_curve(a: &TrainOutcome, b: &TrainOutcome, what: &str) {
    assert_eq!(a.losses.len(), b.losses.len(), "{what}");
    for ((it, x), (jt, y)) in a.losses.iter().zip(&b.losses) {
        assert_eq!(it, jt, "{what}");
        assert!(
            rel(*x, *y) <= 1e-5,
            "{what}: iteration {it}: {x} vs {y} (rel {:.2e})",
            rel(*x, *y)
        );
    }
    for ((it, x), (_, y)) in a.grad_norms.iter().zip(&b.grad_norms) {
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(rel(x, y) <= 1e-4, "{what}: iteration {it}: grad norm {x} vs {y}");
    }
}

/// Global (unsharded) tensors of one part (`model` or `optimizer`) of the last checkpoint.
fn saved(dir: &Path, part: &str) -> BTreeMap<String, Tensor> {
    let iter = dir.join(format!("iter_{ITERS:07}"));
    mbridge::ckpt::load_tensors(&iter, part)
        .unwrap()
        .into_iter()
        .map(|(k, (t, _))| (k, t))
        .collect()
}

fn assert_same_tensors(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}");
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.dims(), y.dims(), "{what}: {name}");
        let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        assert!(diff / scale <= 1e-4, "{what}: {name} differs by {diff} (max |x| {scale})");
    }
}

#[test]
fn dp2_ddp_and_distributed_optimizer_and_tp2xdp2_match_dp1() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let save = |i: usize| format!("+checkpoint.save={}", dirs[i].path().display());
    let base = single(&[&save(0)]);
    assert!(base.losses.last().unwrap().1 < base.losses[0].1 * 0.9, "{:?}", base.losses);
    // Several small buckets, reduced on the communication thread.
    let buckets = ["ddp.overlap_grad_reduce=true", "++ddp.bucket_size=6000"];
    let ddp = run_ranks(2, &[buckets[0], buckets[1], &save(1)]);
    assert_same_curve(&base, &ddp[0], "DP=2");
    let zero1 = run_ranks(
        2,
        &[
            buckets[0],
            buckets[1],
            "ddp.use_distributed_optimizer=true",
            "ddp.overlap_param_gather=true",
            &save(2),
        ],
    );
    assert_same_curve(&base, &zero1[1], "DP=2 distributed optimizer");
    // The optimizer's spelling of the flag, one bucket, averaging in the collective.
    let both = run_ranks(
        4,
        &[
            "model.tensor_model_parallel_size=2",
            "optimizer.use_distributed_optimizer=true",
            "ddp.average_in_collective=true",
            &save(3),
        ],
    );
    assert_same_curve(&base, &both[3], "TP=2 × DP=2 distributed optimizer");
    let weights = saved(dirs[0].path(), "model");
    let state = saved(dirs[0].path(), "optimizer");
    for (i, what) in [(1, "DP=2"), (2, "DP=2 distributed optimizer"), (3, "TP=2 × DP=2 ZeRO-1")] {
        assert_same_tensors(&weights, &saved(dirs[i].path(), "model"), what);
        // The distributed optimizer saves full moments, in the replicated optimizer's names.
        assert_same_tensors(&state, &saved(dirs[i].path(), "optimizer"), what);
    }
}

#[test]
fn distributed_optimizer_checkpoint_resumes_at_dp1_and_dp4() {
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().display());
    let load = format!("+checkpoint.load={}", dir.path().display());
    let zero = "ddp.use_distributed_optimizer=true";
    let full = single(&[]);
    let first = run_ranks(2, &[zero, "+train.exit_interval=10", &save]);
    assert_eq!(first[0].final_step, 10);
    let tail = TrainOutcome {
        losses: full.losses[10..].to_vec(),
        grad_norms: full.grad_norms[10..].to_vec(),
        ..full
    };
    // Into one process with the replicated optimizer (no saving, so the checkpoint stays).
    let one = single(&[&load]);
    assert_eq!(one.losses[0].0, 11);
    assert_same_curve(&tail, &one, "ZeRO-1 DP=2 checkpoint resumed at DP=1");
    // Into DP=4 with the distributed optimizer (state re-sharded four ways).
    let four = run_ranks(4, &[zero, &load]);
    assert_same_curve(&tail, &four[2], "ZeRO-1 DP=2 checkpoint resumed at DP=4 ZeRO-1");
}

#[test]
fn replicated_checkpoint_resumes_into_the_distributed_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().display());
    let load = format!("+checkpoint.load={}", dir.path().display());
    let full = single(&[]);
    single(&["+train.exit_interval=10", &save]);
    let resumed = run_ranks(2, &["ddp.use_distributed_optimizer=true", &load]);
    let tail = TrainOutcome {
        losses: full.losses[10..].to_vec(),
        grad_norms: full.grad_norms[10..].to_vec(),
        ..full
    };
    assert_same_curve(&tail, &resumed[0], "DP=1 checkpoint resumed at DP=2 ZeRO-1");
}

#[test]
fn weight_hash_check_names_the_diverged_replica() {
    let check = "++train.check_weight_hash_across_dp_replicas_interval=2";
    // Healthy replicas pass the check (with and without the distributed optimizer).
    run_ranks(2, &[check, "train.train_iters=4"]);
    run_ranks(2, &[check, "train.train_iters=4", "ddp.use_distributed_optimizer=true"]);
    // Rank 1's copy of one weight is nudged before training: the replicated optimizer applies
    // identical updates, so the replicas stay different and the check must stop the run.
    let err = try_run_ranks(2, &[check, "train.train_iters=4"], |rank, t| {
        if rank == 1 {
            let p = &t.model().params().params()[0];
            let nudged = (p.var.as_tensor() + 1e-3).unwrap();
            p.var.set(&nudged).unwrap();
        }
    })
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("iteration 2: weights differ across data-parallel replicas"), "{msg}");
    assert!(msg.contains("rank 1 (DP rank 1) differs from rank 0"), "{msg}");
    assert!(msg.contains("embedding.word_embeddings.weight"), "{msg}");
}

#[test]
fn ddp_options_the_engine_cannot_honour_are_rejected() {
    // Megatron's own rules fail at finalize.
    for (set, needle) in [
        ("ddp.overlap_param_gather=true", "needs the distributed optimizer"),
        ("++train.check_weight_hash_across_dp_replicas_interval=0", "must be > 0"),
        ("ddp.average_in_collective=true", "cannot be combined"),
    ] {
        let extra = [set, "model.calculate_per_token_loss=true"];
        let extra = if set.starts_with("ddp.average") { &extra[..] } else { &extra[..1] };
        let (loaded, _) = config(extra);
        let e = finalize(loaded.cfg, Some(2), None).err().unwrap().to_string();
        assert!(e.contains(needle), "{set}: {e}");
    }
    // What the engine cannot do is refused when the run is built, naming the field.
    for (set, needle) in [
        ("++comm_overlap.tp_comm_overlap=true", "comm_overlap.tp_comm_overlap"),
        ("++comm_overlap.delay_wgrad_compute=true", "comm_overlap.delay_wgrad_compute"),
        ("ddp.num_distributed_optimizer_instances=2", "num_distributed_optimizer_instances"),
        ("ddp.use_megatron_fsdp=true", "Megatron FSDP"),
        ("model.cp_comm_type=\"p2p\"", "model.cp_comm_type"),
    ] {
        let (loaded, toml) = config(&[set]);
        let fin = finalize(loaded.cfg, None, None).unwrap();
        let e = Trainer::new(fin, toml, Device::Cpu).err().unwrap().to_string();
        assert!(e.contains(needle) && e.contains("cannot do"), "{set}: {e}");
    }
    // comm_overlap turns on overlap automatically with DP > 1, as Megatron Bridge does.
    let (loaded, _) =
        config(&["++comm_overlap.bucket_size=1000", "ddp.use_distributed_optimizer=true"]);
    let fin = finalize(loaded.cfg, Some(2), None).unwrap();
    assert!(fin.cfg.ddp.overlap_grad_reduce && fin.cfg.ddp.overlap_param_gather);
    assert_eq!(fin.cfg.ddp.bucket_size, Some(1000));
    assert!(fin.cfg.optimizer.use_distributed_optimizer);
}

#[test]
fn bf16_parameters_with_the_distributed_optimizer_track_one_process() {
    let bf16 = ["mixed_precision=bf16_mixed", "train.train_iters=8"];
    let base = single(&bf16);
    let zero1 = run_ranks(2, &[bf16[0], bf16[1], "ddp.use_distributed_optimizer=true"]);
    assert_eq!(base.losses.len(), 8);
    assert_eq!(zero1[0].losses.len(), 8);
    // Masters and moments are f32 in both; the sums over DP differ only in bf16 rounding of
    // the forward, so the curves agree to bf16 precision.
    for ((it, x), (_, y)) in base.losses.iter().zip(&zero1[0].losses) {
        assert!(rel(*x, *y) < 1e-2, "iteration {it}: {x} vs {y}");
    }
}

/// The precision-aware optimizer keeps bf16 parameters' masters as remainders
/// (`optimizer.store_param_remainders`): the same f32 masters as copies, so one process follows
/// the copy run (parameters differ only where a master ties between two bf16 values), and
/// two ranks with the remainders sharded follow one process to bf16 precision.
#[test]
fn precision_aware_remainders_track_fp32_master_copies() {
    let bf16 = ["mixed_precision=bf16_mixed", "train.train_iters=8"];
    let base = single(&bf16);
    let aware = [
        bf16[0],
        bf16[1],
        "optimizer.use_precision_aware_optimizer=true",
        "ddp.use_distributed_optimizer=true",
    ];
    let one = single(&aware);
    let zero1 = run_ranks(2, &aware);
    for ((it, x), (_, y)) in base.losses.iter().zip(&one.losses) {
        assert!(rel(*x, *y) < 1e-4, "iteration {it}: {x} vs {y}");
    }
    assert_eq!(zero1[0].losses.len(), 8);
    for ((it, x), (_, y)) in one.losses.iter().zip(&zero1[0].losses) {
        assert!(rel(*x, *y) < 1e-2, "iteration {it}: {x} vs {y}");
    }
    // A checkpoint of the sharded remainders (written as f32 masters) resumes the same run.
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().display());
    let load = format!("+checkpoint.load={}", dir.path().display());
    run_ranks(2, &[&aware[..], &["+train.exit_interval=4", &save]].concat());
    let resumed = run_ranks(2, &[&aware[..], &[load.as_str()]].concat());
    let tail = |o: &TrainOutcome| TrainOutcome {
        losses: o.losses[4..].to_vec(),
        grad_norms: o.grad_norms[4..].to_vec(),
        ..o.clone()
    };
    assert_same_curve(&tail(&zero1[0]), &resumed[0], "remainders resumed at DP=2");
}

/// The precision-aware optimizer's bf16 moments (`optimizer.exp_avg_dtype` /
/// `exp_avg_sq_dtype` = bf16): one process and two ranks (moments sharded) follow the f32
/// moments' curve to bf16 precision, and a checkpoint (moments written as f32) resumes the
/// two-rank run exactly.
#[test]
fn bf16_moments_track_f32_moments() {
    let aware = [
        "mixed_precision=bf16_mixed",
        "train.train_iters=8",
        "optimizer.use_precision_aware_optimizer=true",
        "ddp.use_distributed_optimizer=true",
    ];
    let base = single(&aware);
    let bf16 =
        [&aware[..], &["optimizer.exp_avg_dtype=bf16", "optimizer.exp_avg_sq_dtype=bf16"]].concat();
    let one = single(&bf16);
    let zero1 = run_ranks(2, &bf16);
    assert_eq!((one.losses.len(), zero1[0].losses.len()), (8, 8));
    let mut differ = false;
    for (((it, x), (_, y)), (_, z)) in base.losses.iter().zip(&one.losses).zip(&zero1[0].losses) {
        assert!(rel(*x, *y) < 1e-2, "iteration {it}: f32 moments {x} vs bf16 {y}");
        assert!(rel(*y, *z) < 1e-2, "iteration {it}: one process {y} vs two ranks {z}");
        differ |= x != y;
    }
    assert!(differ, "bf16 moments changed nothing: {:?}", one.losses);
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().display());
    let load = format!("+checkpoint.load={}", dir.path().display());
    run_ranks(2, &[&bf16[..], &["+train.exit_interval=4", &save]].concat());
    let resumed = run_ranks(2, &[&bf16[..], &[load.as_str()]].concat());
    let tail = |o: &TrainOutcome| TrainOutcome {
        losses: o.losses[4..].to_vec(),
        grad_norms: o.grad_norms[4..].to_vec(),
        ..o.clone()
    };
    assert_same_curve(&tail(&zero1[0]), &resumed[0], "bf16 moments resumed at DP=2");
}

/// `grad_reduce_in_fp32 = false` (Megatron Bridge's performance recipes): bf16 gradients are
/// summed, reduced over DP and handed to the optimizer in bf16, and still train the curve of
/// f32 main grads to bf16 precision, on one process and on two with the distributed
/// optimizer.
#[test]
fn bf16_main_grads_track_fp32_main_grads() {
    // Tied embeddings: the output layer's gradient stays f32 where the embedding joins it.
    let bf16 = [
        "mixed_precision=bf16_mixed",
        "train.train_iters=8",
        "model.share_embeddings_and_output_weights=true",
    ];
    let base = single(&bf16);
    let half = [&bf16[..], &["mixed_precision.grad_reduce_in_fp32=false"]].concat();
    let one = single(&half);
    let zero1 = run_ranks(2, &[&half[..], &["ddp.use_distributed_optimizer=true"]].concat());
    // PP=2: the tied embedding's two copies (f32 on the first stage, bf16 on the last) are
    // summed over the embedding group.
    let pp = run_ranks(2, &[&half[..], &["model.pipeline_model_parallel_size=2"]].concat());
    let last = pp.iter().find(|o| !o.losses.is_empty()).expect("the last stage reports");
    for run in [&one, &zero1[0], last] {
        assert_eq!(run.losses.len(), 8);
        for ((it, x), (_, y)) in base.losses.iter().zip(&run.losses) {
            assert!(rel(*x, *y) < 1e-2, "iteration {it}: {x} vs {y}");
        }
    }
    // The rounding is real: the curves are not bit-identical.
    assert_ne!(base.losses, one.losses);
}

/// `optimizer.decoupled_lr` under the distributed optimizer: each rank's slices of the
/// embedding and output layer take the decoupled rate, so DP=2 with ZeRO-1 (small buckets, so
/// those tensors are cut across ranks) saves the weights one process saves.
#[test]
fn decoupled_lr_with_the_distributed_optimizer_matches_one_process() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let save = |i: usize| format!("+checkpoint.save={}", dirs[i].path().display());
    let decoupled = ["+optimizer.decoupled_lr=1e-2", "+optimizer.decoupled_min_lr=1e-3"];
    let base = single(&[decoupled[0], decoupled[1], &save(0)]);
    let zero1 = run_ranks(
        2,
        &[
            decoupled[0],
            decoupled[1],
            "ddp.use_distributed_optimizer=true",
            "++ddp.bucket_size=6000",
            &save(1),
        ],
    );
    assert_same_curve(&base, &zero1[0], "DP=2 distributed optimizer, decoupled lr");
    let (a, b) = (saved(dirs[0].path(), "model"), saved(dirs[1].path(), "model"));
    assert_same_tensors(&a, &b, "decoupled lr");
    // The decoupled rate is not the main one: without it the embedding ends elsewhere.
    let dir = tempfile::tempdir().unwrap();
    single(&[&format!("+checkpoint.save={}", dir.path().display())]);
    let plain = saved(dir.path(), "model");
    let e = "embedding.word_embeddings.weight";
    let diff = (&plain[e] - &a[e]).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-4);
}
