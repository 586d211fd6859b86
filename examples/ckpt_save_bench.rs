//! Checkpoint save bandwidth of a Llama-3.2-1B-shaped model (random weights, no training), and
//! the training-loop stall of an asynchronous save. Run by `scripts/bench/ckpt_save.sh`.
//!
//! ```text
//! cargo run --example ckpt_save_bench -- <dir> [bf16|f32] [layers]
//! ```
//! Prints one `key=value` line per measurement.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use mbridge::ckpt::{
    save_checkpoint, AsyncSaver, OwnedCheckpoint, Partition, ShardedParam, TensorSet, TrainState,
};

/// Llama-3.2-1B: hidden 2048, FFN 8192, 32 heads / 8 KV heads of 64, vocab 128256, tied head.
fn model(dtype: DType, layers: usize) -> Result<Vec<ShardedParam>> {
    let (h, f, kv, v) = (2048usize, 8192usize, 512usize, 128256usize);
    let mut shapes: Vec<(String, Vec<usize>, Partition)> =
        vec![("embedding.word_embeddings.weight".into(), vec![v, h], Partition::Split(0))];
    for l in 0..layers {
        let p = format!("decoder.layers.{l}");
        shapes.push((
            format!("{p}.self_attention.linear_qkv.layer_norm_weight"),
            vec![h],
            Partition::Replicated,
        ));
        shapes.push((
            format!("{p}.self_attention.linear_qkv.weight"),
            vec![h + 2 * kv, h],
            Partition::Split(0),
        ));
        shapes.push((
            format!("{p}.self_attention.linear_proj.weight"),
            vec![h, h],
            Partition::Split(1),
        ));
        shapes.push((
            format!("{p}.mlp.linear_fc1.layer_norm_weight"),
            vec![h],
            Partition::Replicated,
        ));
        shapes.push((format!("{p}.mlp.linear_fc1.weight"), vec![2 * f, h], Partition::GatedSplit));
        shapes.push((format!("{p}.mlp.linear_fc2.weight"), vec![h, f], Partition::Split(1)));
    }
    shapes.push(("decoder.final_layernorm.weight".into(), vec![h], Partition::Replicated));
    shapes
        .into_iter()
        .map(|(name, shape, partition)| {
            let tensor = Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?.to_dtype(dtype)?;
            Ok(ShardedParam { name, tensor, partition })
        })
        .collect()
}

fn checkpoint(iteration: u64, params: Vec<ShardedParam>) -> OwnedCheckpoint {
    OwnedCheckpoint {
        iteration,
        model: vec![TensorSet { tp_rank: 0, pp_rank: 0, dp_rank: None, params }],
        optimizer: None,
        json: vec![],
        train_state: TrainState { step: iteration, ..Default::default() },
        run_config_toml: String::new(),
        tokenizer_files: vec![],
    }
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        n += if e.file_type()?.is_dir() { dir_bytes(&e.path())? } else { e.metadata()?.len() };
    }
    Ok(n)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir =
        PathBuf::from(args.get(1).context("usage: ckpt_save_bench <dir> [bf16|f32] [layers]")?);
    let dtype = match args.get(2).map(String::as_str).unwrap_or("bf16") {
        "f32" => DType::F32,
        _ => DType::BF16,
    };
    let layers: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let t = Instant::now();
    let params = model(dtype, layers)?;
    let n: usize = params.iter().map(|p| p.tensor.elem_count()).sum();
    println!("params={n} dtype={dtype:?} build_s={:.1}", t.elapsed().as_secs_f64());

    // Synchronous save: everything from shards to tracker, fsynced.
    let ckpt = checkpoint(1, params);
    let t = Instant::now();
    let it = save_checkpoint(&dir, &ckpt.as_write(), -1)?;
    let secs = t.elapsed().as_secs_f64();
    let bytes = dir_bytes(&it)?;
    println!("sync_save_s={secs:.2} bytes={bytes} sync_save_MBps={:.0}", bytes as f64 / secs / 1e6);

    // Asynchronous save: the loop stalls only to hand over tensor handles; the writer copies
    // the weights while the next step's forward/backward runs, and the optimizer step waits
    // for that copy (`wait_snapshot`), which is the worst case when a step is shorter.
    let mut saver = AsyncSaver::new();
    let t = Instant::now();
    saver.submit(&dir, checkpoint(2, ckpt.model[0].params.clone()), 1)?;
    let stall = t.elapsed().as_secs_f64();
    saver.wait_snapshot();
    let copy = t.elapsed().as_secs_f64();
    let done = saver.wait()?.context("the async save did not report")?;
    println!(
        "async_submit_stall_ms={:.2} async_copy_ms={:.0} async_save_s={:.2} stall_pct_of_save={:.3} copy_pct_of_save={:.1}",
        stall * 1e3,
        copy * 1e3,
        done.seconds,
        100.0 * stall / done.seconds,
        100.0 * copy / done.seconds
    );
    Ok(())
}
