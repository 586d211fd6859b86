//! Checkpoint directories: atomic layout, tracker, pruning, resharded loading, bad input.

use std::path::Path;

use candle_core::{Device, Tensor};
use mbridge::ckpt::layout::shard_of;
use mbridge::ckpt::*;

fn params(tp: usize) -> Vec<TensorSet> {
    let dev = Device::Cpu;
    let qkv = Tensor::arange(0f32, 24., &dev).unwrap().reshape((4, 6)).unwrap();
    let fc1 = Tensor::arange(0f32, 32., &dev).unwrap().reshape((8, 4)).unwrap();
    let norm = Tensor::ones(6, candle_core::DType::F32, &dev).unwrap();
    (0..tp)
        .map(|r| TensorSet {
            tp_rank: r,
            pp_rank: 0,
            dp_rank: None,
            params: vec![
                ShardedParam {
                    name: "decoder.layers.0.self_attention.linear_qkv.weight".into(),
                    tensor: shard_of(&qkv, Partition::Split(0), r, tp).unwrap(),
                    partition: Partition::Split(0),
                },
                ShardedParam {
                    name: "decoder.layers.0.mlp.linear_fc1.weight".into(),
                    tensor: shard_of(&fc1, Partition::GatedSplit, r, tp).unwrap(),
                    partition: Partition::GatedSplit,
                },
                ShardedParam {
                    name: "decoder.final_layernorm.weight".into(),
                    tensor: norm.clone(),
                    partition: Partition::Replicated,
                },
            ],
        })
        .collect()
}

fn save(dir: &Path, iteration: u64, tp: usize, k: impl Into<Retention>) -> std::path::PathBuf {
    let model = params(tp);
    let state =
        TrainState { step: iteration, consumed_train_samples: iteration * 8, ..Default::default() };
    let w = CheckpointWrite {
        iteration,
        model: &model,
        optimizer: None,
        json: vec![("scheduler".into(), serde_json::json!({"num_steps": iteration * 8}))],
        train_state: &state,
        run_config_toml: "[train]\ntrain_iters = 10\n",
        tokenizer_files: &[],
    };
    save_checkpoint(dir, &w, k).unwrap()
}

#[test]
fn layout_tracker_and_resharded_load() {
    let dir = tempfile::tempdir().unwrap();
    let it = save(dir.path(), 100, 2, -1);
    assert_eq!(it, dir.path().join("iter_0000100"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("latest_checkpointed_iteration.txt")).unwrap(),
        "100"
    );
    for f in [
        "train_state.json",
        "run_config.toml",
        "scheduler.json",
        "model/index.json",
        "model/shard_tp01_pp00.safetensors",
    ] {
        assert!(it.join(f).is_file(), "{f} missing");
    }
    // Saved with TP=2, loaded as the global tensors a TP=1 run needs.
    let loaded = load_tensors(&it, "model").unwrap();
    let (fc1, p) = &loaded["decoder.layers.0.mlp.linear_fc1.weight"];
    assert_eq!(*p, Partition::GatedSplit);
    let expect = Tensor::arange(0f32, 32., &Device::Cpu).unwrap().reshape((8, 4)).unwrap();
    assert_eq!(fc1.to_vec2::<f32>().unwrap(), expect.to_vec2::<f32>().unwrap());
    assert_eq!(loaded["decoder.layers.0.self_attention.linear_qkv.weight"].0.dims(), &[4, 6]);
    assert_eq!(find_checkpoint(dir.path(), None).unwrap(), Some(it.clone()));
    assert_eq!(read_json(&it, "scheduler").unwrap().unwrap()["num_steps"], 800);
    assert!(read_json(&it, "rng").unwrap().is_none());
    assert_eq!(find_checkpoint(&it, None).unwrap(), Some(it));
}

#[test]
fn most_recent_k_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    for it in [100, 200, 300] {
        save(dir.path(), it, 1, 2);
    }
    assert_eq!(iteration_dirs(dir.path()), ["iter_0000200", "iter_0000300"]);
}

/// The `iter_*` directories under `dir`, sorted.
fn iteration_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("iter_"))
        .collect();
    names.sort();
    names
}

/// `checkpoint.save_retain_interval`: a checkpoint at a multiple of it stays; the others go
/// once a newer one is committed (Megatron's rule), or beyond `most_recent_k` when that is set.
#[test]
fn save_retain_interval_keeps_multiples_and_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let retain = |k: i64| Retention { most_recent_k: k, retain_interval: Some(200) };
    for it in [100, 200, 300, 400, 500] {
        save(dir.path(), it, 1, retain(-1));
    }
    assert_eq!(iteration_dirs(dir.path()), ["iter_0000200", "iter_0000400", "iter_0000500"]);
    let dir = tempfile::tempdir().unwrap();
    for it in [100, 200, 300, 400, 500, 700] {
        save(dir.path(), it, 1, retain(3));
    }
    // The three newest, and 200 (retained) beyond them.
    assert_eq!(
        iteration_dirs(dir.path()),
        ["iter_0000200", "iter_0000400", "iter_0000500", "iter_0000700"]
    );
}

#[test]
fn incomplete_checkpoints_are_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let good = save(dir.path(), 10, 1, -1);
    // A crash mid-save leaves a temp dir and maybe a half iter dir without train_state.json.
    std::fs::create_dir_all(dir.path().join(".iter_0000020.tmp-999/model")).unwrap();
    std::fs::create_dir_all(dir.path().join("iter_0000030/model")).unwrap();
    assert_eq!(find_checkpoint(dir.path(), None).unwrap(), Some(good.clone()));
    // The tracker pointing at an incomplete iteration falls back to the newest complete one.
    std::fs::write(dir.path().join("latest_checkpointed_iteration.txt"), "30").unwrap();
    assert_eq!(find_checkpoint(dir.path(), None).unwrap(), Some(good));
    // A new save cleans the stale temp dir.
    save(dir.path(), 40, 1, -1);
    assert!(!dir.path().join(".iter_0000020.tmp-999").exists());
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let it = save(dir.path(), 5, 1, -1);
    let e = find_checkpoint(dir.path(), Some(6)).unwrap_err().to_string();
    assert!(e.contains("ckpt_step=6") && e.contains("iter_0000006"), "{e}");
    std::fs::write(dir.path().join("latest_checkpointed_iteration.txt"), "five").unwrap();
    let e = find_checkpoint(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("should hold an iteration number"), "{e}");
    let shard = it.join("model/shard_tp00_pp00.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", load_tensors(&it, "model").unwrap_err());
    assert!(e.contains("shard_tp00_pp00.safetensors") && e.contains("truncated"), "{e}");
    assert!(find_checkpoint(&dir.path().join("nope"), None).unwrap().is_none());
}

#[test]
fn saving_the_same_iteration_twice_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), 7, 1, -1);
    let it = save(dir.path(), 7, 2, -1);
    assert!(it.join("model/shard_tp01_pp00.safetensors").is_file());
    assert_eq!(load_tensors(&it, "model").unwrap().len(), 3);
}
