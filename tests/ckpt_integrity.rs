//! Checkpoint integrity: checksums catch flipped bytes and truncation, a missing index and
//! NaN tensors give clear errors, the async writer reports failures by checkpoint name, and
//! pruning or a crashed re-save never loses the newest complete checkpoint.

use std::path::Path;

use candle_core::{Device, Tensor};
use mbridge::ckpt::*;

fn model(scale: f32) -> Vec<TensorSet> {
    let dev = Device::Cpu;
    let w =
        (Tensor::arange(0f32, 24., &dev).unwrap().reshape((4, 6)).unwrap() * scale as f64).unwrap();
    let b = Tensor::ones(6, candle_core::DType::BF16, &dev).unwrap();
    vec![TensorSet {
        tp_rank: 0,
        pp_rank: 0,
        dp_rank: None,
        params: vec![
            ShardedParam { name: "decoder.w".into(), tensor: w, partition: Partition::Split(0) },
            ShardedParam { name: "decoder.b".into(), tensor: b, partition: Partition::Replicated },
        ],
    }]
}

fn owned(iteration: u64, model: Vec<TensorSet>) -> OwnedCheckpoint {
    OwnedCheckpoint {
        iteration,
        model,
        optimizer: None,
        json: vec![],
        train_state: TrainState { step: iteration, ..Default::default() },
        run_config_toml: String::new(),
        tokenizer_files: vec![],
    }
}

fn save(dir: &Path, iteration: u64, k: i64) -> std::path::PathBuf {
    save_checkpoint(dir, &owned(iteration, model(1.0)).as_write(), k).unwrap()
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn index_records_size_and_crc_of_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let it = save(dir.path(), 1, -1);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(it.join("model/index.json")).unwrap())
            .unwrap();
    let shard = it.join("model/shard_tp00_pp00.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let info = &index["files"]["shard_tp00_pp00.safetensors"];
    assert_eq!(info["bytes"], bytes.len() as u64);
    assert_eq!(info["crc32c"], crc32c::crc32c(&bytes) as u64);
    // The shard is a standard safetensors file.
    let back = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    assert_eq!(back["decoder.w"].to_vec2::<f32>().unwrap()[3][5], 23.0);
    assert_eq!(back["decoder.b"].dtype(), candle_core::DType::BF16);
}

#[test]
fn flipped_byte_truncation_and_missing_index_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let it = save(dir.path(), 1, -1);
    let shard = it.join("model/shard_tp00_pp00.safetensors");
    let good = std::fs::read(&shard).unwrap();
    // One flipped bit in the tensor data (not the header): only the checksum can tell.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x10;
    std::fs::write(&shard, &bad).unwrap();
    let e = err_of(load_tensors(&it, "model"));
    assert!(e.contains("shard_tp00_pp00.safetensors") && e.contains("corrupted"), "{e}");
    std::fs::write(&shard, &good[..n - 1]).unwrap();
    let e = err_of(load_tensors(&it, "model"));
    assert!(e.contains("shard_tp00_pp00.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(&shard, &good).unwrap();
    assert_eq!(load_tensors(&it, "model").unwrap().len(), 2);
    std::fs::remove_file(it.join("model/index.json")).unwrap();
    let e = err_of(load_tensors(&it, "model"));
    assert!(e.contains("missing") && e.contains("model/index.json"), "{e}");
    // Without its index the directory is not a complete checkpoint.
    assert!(!is_complete(&it));
}

#[test]
fn nan_tensors_are_never_saved_and_nothing_on_disk_changes() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), 1, 1);
    let mut bad = model(1.0);
    bad[0].params[0].tensor = (&bad[0].params[0].tensor / 0.0).unwrap(); // 0/0 = NaN, x/0 = inf
    let e = err_of(save_checkpoint(dir.path(), &owned(2, bad).as_write(), 1));
    assert!(
        e.contains("decoder.w") && e.contains("NaN or Inf") && e.contains("iter_0000002"),
        "{e}"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("iter_"))
        .collect();
    assert_eq!(names, ["iter_0000001"], "a failed save must leave nothing behind");
    assert_eq!(read_tracker(dir.path()).unwrap(), Some(1));
}

#[test]
fn async_saver_writes_in_background_and_reports_failures_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut saver = AsyncSaver::new();
    assert!(saver.submit(dir.path(), owned(3, model(1.0)), -1).unwrap().is_none());
    // A second submit waits for the first and hands it back.
    let first = saver.submit(dir.path(), owned(4, model(2.0)), 1).unwrap().unwrap();
    assert_eq!(first.iteration, 3);
    assert!(first.dir.ends_with("iter_0000003"));
    let second = saver.wait().unwrap().unwrap();
    assert_eq!(second.iteration, 4);
    assert_eq!(read_tracker(dir.path()).unwrap(), Some(4));
    assert!(!dir.path().join("iter_0000003").exists(), "most_recent_k=1 prunes after the save");
    let w = &load_tensors(&second.dir, "model").unwrap()["decoder.w"].0;
    assert_eq!(w.to_vec2::<f32>().unwrap()[0][1], 2.0);
    // Failure: a NaN model; the error names the checkpoint and surfaces at wait/poll.
    let mut bad = model(1.0);
    bad[0].params[1].tensor = (&bad[0].params[1].tensor * f64::INFINITY).unwrap();
    saver.submit(dir.path(), owned(5, bad), 1).unwrap();
    let e = err_of(saver.wait());
    assert!(e.contains("asynchronous save of checkpoint") && e.contains("iter_0000005"), "{e}");
    assert!(e.contains("decoder.b"), "{e}");
    assert_eq!(read_tracker(dir.path()).unwrap(), Some(4));
    assert!(!saver.is_pending());
    assert!(saver.poll().unwrap().is_none());
}

#[test]
fn pruning_keeps_the_checkpoint_just_saved_even_if_older() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), 100, -1);
    save(dir.path(), 200, -1);
    // A run resumed at 100 (ckpt_step) saves 150 with most_recent_k=1: 150 must survive.
    save(dir.path(), 150, 1);
    assert!(is_complete(&dir.path().join("iter_0000150")));
    assert!(!dir.path().join("iter_0000100").exists());
    assert_eq!(find_checkpoint(dir.path(), None).unwrap(), Some(dir.path().join("iter_0000150")));
}

#[test]
fn a_crash_between_the_renames_of_a_resave_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let it = save(dir.path(), 7, -1);
    // Simulate: iter_0000007 moved aside, the new copy never moved in.
    let old = dir.path().join(".iter_0000007.old-4242");
    std::fs::rename(&it, &old).unwrap();
    std::fs::create_dir_all(dir.path().join(".iter_0000008.tmp-4242/model")).unwrap();
    save(dir.path(), 8, -1);
    assert!(is_complete(&it), "the moved-aside checkpoint was restored");
    assert!(!old.exists());
    assert!(!dir.path().join(".iter_0000008.tmp-4242").exists());
    assert_eq!(load_tensors(&it, "model").unwrap().len(), 2);
}
