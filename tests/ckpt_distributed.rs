//! Distributed checkpoint saves: every rank writes the shards it owns, rank 0 indexes and
//! commits. A TP=2 × PP=2 × DP=2 run (ranks as threads) with the distributed optimizer and
//! async save: each rank's own report names the files it wrote; the checkpoint is the same,
//! byte for byte, as one process writing every rank's tensors; resuming from it continues the
//! loss curve bit for bit. A rank that fails makes every rank fail and leaves nothing behind.

mod cli_common;
mod train_common;

use cli_common::files;

use train_common::tiny_config;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use mbridge::ckpt::{
    read_tracker, save_checkpoint, save_checkpoint_on, CheckpointWrite, OwnedCheckpoint, Partition,
    RankSave, ShardedParam, TensorSet, TrainState,
};
use mbridge::config::finalize;
use mbridge::parallel::comm::{Communicator, LocalWorld};
use mbridge::parallel::{ProcessGroups, Topology};
use mbridge::train::trainer::{TrainOutcome, Trainer};

const WORLD: usize = 8;
const LAYOUT: [&str; 3] = [
    "model.tensor_model_parallel_size=2",
    "model.pipeline_model_parallel_size=2",
    "ddp.use_distributed_optimizer=true",
];

fn config(extra: &[&str]) -> (mbridge::config::LoadedConfig, String) {
    let base = ["validation.eval_iters=0", "rng.seed=5", "train.micro_batch_size=2"];
    tiny_config(&[&base[..], &LAYOUT[..], extra].concat())
}

/// One rank's result: its coordinates (tp, pp, dp), its training, its part of a checkpoint
/// of the final state and what it wrote when saving that part itself.
struct RankRun {
    coords: (usize, usize, usize),
    outcome: TrainOutcome,
    snapshot: OwnedCheckpoint,
    saved: Option<RankSave>,
}

/// Trains all ranks; then, when `again` is given, every rank saves its snapshot of the final
/// state there through `save_checkpoint_on` as well.
fn run_ranks(extra: &[&str], again: Option<&Path>) -> Vec<RankRun> {
    let (loaded, toml) = config(extra);
    LocalWorld::run(WORLD, Duration::from_secs(300), |rank, lw| {
        let fin = finalize(loaded.cfg.clone(), Some(WORLD), None)?;
        let topo = Topology::from_config(&fin.cfg.model, &fin.cfg.dist, WORLD)?;
        let groups = ProcessGroups::local(lw, topo, rank)?;
        let c = groups.coords;
        let ckpt = groups.ckpt.clone();
        let mut t = Trainer::new_rank(fin, toml.clone(), Device::Cpu, Some(groups))?;
        let outcome = t.train()?;
        let snapshot = t.checkpoint_snapshot()?;
        let saved = match again {
            Some(dir) => Some(save_checkpoint_on(dir, &snapshot.as_write(), -1, Some(&*ckpt))?),
            None => None,
        };
        Ok(RankRun { coords: (c.tp, c.pp, c.dp), outcome, snapshot, saved })
    })
    .unwrap()
}

fn assert_same_files(want: &Path, got: &Path, what: &str) {
    let (a, b) = (files(want), files(got));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: file set");
    for (name, bytes) in &a {
        assert!(*bytes == b[name], "{what}: `{name}` differs");
    }
}

#[test]
fn every_rank_writes_its_own_shards_and_the_checkpoint_is_one_writers() {
    let tmp = tempfile::tempdir().unwrap();
    let (trained, again, single) =
        (tmp.path().join("trained"), tmp.path().join("again"), tmp.path().join("single"));
    let save = format!("+checkpoint.save={}", trained.display());
    let ranks = run_ranks(
        &[
            "train.train_iters=4",
            "++checkpoint.save_interval=2",
            "++checkpoint.async_save=true",
            &save,
        ],
        Some(&again),
    );
    assert_eq!(ranks[0].outcome.final_step, 4);

    // Ownership, from each rank's own report: DP rank 0 of each (tp, pp) position wrote its
    // model shard, DP rank 1 its optimizer shard, nobody anything else.
    for (rank, r) in ranks.iter().enumerate() {
        let (tp, pp, dp) = r.coords;
        let saved = r.saved.as_ref().unwrap();
        let shards: Vec<&String> =
            saved.written.iter().filter(|f| f.ends_with(".safetensors")).collect();
        let part = if dp == 0 { "model" } else { "optimizer" };
        assert_eq!(
            shards,
            [&format!("{part}/shard_tp{tp:02}_pp{pp:02}.safetensors")],
            "rank {rank} {:?}",
            r.coords
        );
        assert_eq!(saved.committed, rank == 0);
        assert!(saved.bytes > 0);
        let small = saved.written.len() - shards.len();
        assert_eq!(small > 0, rank == 0, "rank {rank} wrote {:?}", saved.written);
    }

    // The same checkpoint from one writer: every rank's tensors, written by this process.
    let r0 = &ranks[0].snapshot;
    let merged = OwnedCheckpoint {
        model: ranks.iter().flat_map(|r| r.snapshot.model.clone()).collect(),
        optimizer: Some(ranks.iter().flat_map(|r| r.snapshot.optimizer.clone().unwrap()).collect()),
        ..r0.clone()
    };
    assert_eq!(merged.model.len(), 4);
    assert_eq!(merged.optimizer.as_ref().unwrap().len(), 4);
    save_checkpoint(&single, &merged.as_write(), -1).unwrap();
    let it = "iter_0000004";
    assert!(files(&single.join(it)).len() >= 12);
    assert_same_files(&single.join(it), &again.join(it), "every rank saving");
    // The trainer's own (asynchronous) save of step 4 is that checkpoint too.
    assert_same_files(&single.join(it), &trained.join(it), "the trainer's async save");
    assert_eq!(read_tracker(&trained).unwrap(), Some(4));
    assert!(trained.join("iter_0000002/model/index.json").is_file());
}

/// The shard and index files of a checkpoint directory (not the config, whose rendering
/// depends on how the run was started).
fn tensor_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files(dir)
        .into_iter()
        .filter(|(n, _)| n.starts_with("model/") || n.starts_with("optimizer/"))
        .collect()
}

#[test]
fn rank_processes_save_what_rank_threads_save() {
    let tmp = tempfile::tempdir().unwrap();
    let (threads, procs) = (tmp.path().join("threads"), tmp.path().join("procs"));
    let common = ["train.train_iters=4", "++checkpoint.async_save=true"];
    let save = format!("+checkpoint.save={}", threads.display());
    run_ranks(&[common[0], common[1], &save], None);
    // Eight processes over TCP: rank 0 names the temporary directory after its own pid and
    // the other processes write into it.
    let out = assert_cmd::Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "--nproc-per-node", "8"])
        .args(["--master-port", "29787", "validation.eval_iters=0", "rng.seed=5"])
        .args(["train.micro_batch_size=2"])
        .args(LAYOUT)
        .args(common)
        .arg(format!("+checkpoint.save={}", procs.display()))
        .timeout(Duration::from_secs(300))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("successfully saved checkpoint").count(), 1, "{stdout}");
    let it = "iter_0000004";
    let (a, b) = (tensor_files(&threads.join(it)), tensor_files(&procs.join(it)));
    assert_eq!(a.len(), 10, "{:?}", a.keys());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(*bytes == b[name], "`{name}` differs between rank threads and processes");
    }
    assert_eq!(read_tracker(&procs).unwrap(), Some(4));
    let left: Vec<_> = std::fs::read_dir(&procs).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().contains(".tmp-")), "{left:?}");
}

#[test]
fn resume_from_a_distributed_save_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", tmp.path().display());
    let load = format!("+checkpoint.load={}", tmp.path().display());
    let full = run_ranks(&["train.train_iters=6"], None);
    let first = run_ranks(&["train.train_iters=6", "+train.exit_interval=3", &save], None);
    assert_eq!(first[0].outcome.final_step, 3);
    let resumed = run_ranks(&["train.train_iters=6", &save, &load], None);
    for (f, r) in full.iter().zip(&resumed) {
        assert_eq!(f.outcome.losses[3..], r.outcome.losses[..], "rank {:?}", f.coords);
        assert_eq!(f.outcome.grad_norms[3..], r.outcome.grad_norms[..]);
    }
}

fn set(tp: usize, pp: usize, value: f32) -> TensorSet {
    let t = Tensor::full(value, (2, 3), &Device::Cpu).unwrap();
    TensorSet {
        tp_rank: tp,
        pp_rank: pp,
        dp_rank: None,
        params: vec![ShardedParam {
            name: format!("decoder.layers.{pp}.mlp.linear_fc2.weight"),
            tensor: t,
            partition: Partition::Split(1),
        }],
    }
}

/// Each of 4 ranks (2 TP × 2 PP) saves iteration `it` with its `sets(rank)`; every rank's
/// error message, or None.
fn save_on_4(
    save: &Path,
    it: u64,
    sets: impl Fn(usize) -> Vec<TensorSet> + Sync,
) -> Vec<Option<String>> {
    LocalWorld::run(4, Duration::from_secs(60), |rank, lw| {
        let world = lw.group(rank, "ckpt", &[0, 1, 2, 3])?;
        let model = sets(rank);
        let state = TrainState { step: it, ..Default::default() };
        let w = CheckpointWrite {
            iteration: it,
            model: &model,
            optimizer: None,
            json: vec![("scheduler".into(), serde_json::json!({"num_steps": it}))],
            train_state: &state,
            run_config_toml: "",
            tokenizer_files: &[],
        };
        Ok(save_checkpoint_on(save, &w, -1, Some(&world as &dyn Communicator))
            .err()
            .map(|e| format!("{e:#}")))
    })
    .unwrap()
}

#[test]
fn a_failing_rank_fails_every_rank_and_leaves_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let good = |rank: usize| vec![set(rank % 2, rank / 2, 1.0)];
    assert_eq!(save_on_4(dir.path(), 1, good), [None, None, None, None]);
    let one = mbridge::ckpt::load_tensors(&dir.path().join("iter_0000001"), "model").unwrap();
    assert_eq!(one["decoder.layers.1.mlp.linear_fc2.weight"].0.dims(), &[2, 6]);
    let before = files(dir.path());

    // Rank 3's shard holds NaN: nobody commits, every rank says why.
    let nan = |rank: usize| vec![set(rank % 2, rank / 2, if rank == 3 { f32::NAN } else { 2.0 })];
    let errors = save_on_4(dir.path(), 2, nan);
    for (rank, e) in errors.iter().enumerate() {
        let e = e.as_ref().unwrap_or_else(|| panic!("rank {rank} did not fail"));
        assert!(e.contains("iter_0000002"), "rank {rank}: {e}");
        assert!(e.contains("NaN"), "rank {rank}: {e}");
    }
    assert!(errors[0].as_ref().unwrap().contains("rank 3"), "{:?}", errors[0]);

    // Two ranks claiming the same shard: refused before anything is committed.
    let clash = |rank: usize| vec![set(rank % 2, 0, 3.0)];
    let errors = save_on_4(dir.path(), 3, clash);
    assert!(errors.iter().all(Option::is_some), "{errors:?}");
    assert!(errors[0].as_ref().unwrap().contains("written by both rank"), "{:?}", errors[0]);
    // A TP rank that wrote nothing: the index would not assemble.
    let missing =
        |rank: usize| if rank == 1 { Vec::new() } else { vec![set(rank % 2, rank / 2, 4.0)] };
    let errors = save_on_4(dir.path(), 4, missing);
    assert!(errors[0].as_ref().unwrap().contains("TP ranks [0]"), "{:?}", errors[0]);

    // Nothing on disk changed: no new directory, no temporary left, tracker still at 1.
    assert_eq!(files(dir.path()), before);
    assert_eq!(read_tracker(dir.path()).unwrap(), Some(1));
}
