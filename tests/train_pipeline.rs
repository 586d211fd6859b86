//! Pipeline-parallel training (1F1B, interleaved, uneven stages, tied embeddings, with TP and
//! DP) on the in-process CPU backend gives the loss curve and the exported weights of one
//! process; pipeline checkpoints load into any other layout.

mod train_common;

use train_common::{tiny_config, train_ranks};

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use mbridge::bridge::export::{export_hf, ExportOptions};
use mbridge::config::finalize;
use mbridge::parallel::comm::LocalWorld;
use mbridge::parallel::{ProcessGroups, Topology};
use mbridge::train::trainer::{TrainOutcome, Trainer};

/// 20 iterations, 4 micro-batches of 2 per global batch (DP=1), f32.
const BASE: [&str; 5] = [
    "train.train_iters=20",
    "train.micro_batch_size=2",
    "validation.eval_iters=0",
    "rng.seed=5",
    "logger.log_interval=5",
];

fn config(extra: &[&str]) -> (mbridge::config::LoadedConfig, String) {
    tiny_config(&[&BASE[..], extra].concat())
}

fn run_ranks(world: usize, extra: &[&str]) -> Vec<TrainOutcome> {
    let (loaded, toml) = config(extra);
    train_ranks(world, &loaded, &toml).unwrap()
}

fn single(extra: &[&str]) -> TrainOutcome {
    let (loaded, toml) = config(extra);
    let fin = finalize(loaded.cfg, None, None).unwrap();
    Trainer::new(fin, toml, Device::Cpu).unwrap().train().unwrap()
}

/// Same iterations, losses within 1e-5 relative, grad norms within 1e-4.
fn assert_close(want: &TrainOutcome, got: &TrainOutcome, what: &str) {
    assert_eq!(
        want.losses.iter().map(|l| l.0).collect::<Vec<_>>(),
        got.losses.iter().map(|l| l.0).collect::<Vec<_>>(),
        "{what}: iterations"
    );
    for ((it, x), (_, y)) in want.losses.iter().zip(&got.losses) {
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(rel <= 1e-5, "{what}: iteration {it}: loss {x} vs {y} (rel {rel:.2e})");
    }
    for ((it, x), (_, y)) in want.grad_norms.iter().zip(&got.grad_norms) {
        let (x, y) = (x.unwrap_or(0.0), y.unwrap_or(0.0));
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(rel <= 1e-4, "{what}: iteration {it}: grad norm {x} vs {y} (rel {rel:.2e})");
    }
}

/// Every rank reports the same (last-stage) loss curve, equal to one process's.
fn assert_all_close(want: &TrainOutcome, got: &[TrainOutcome], what: &str) {
    for (r, o) in got.iter().enumerate() {
        assert_close(want, o, &format!("{what}, rank {r}"));
    }
}

#[test]
fn pp2_tp2xpp2_sp_and_pp2xdp2_match_one_process() {
    let base = single(&[]);
    assert!(base.losses.last().unwrap().1 < base.losses[0].1 - 0.1, "the model learns");
    let pp = "model.pipeline_model_parallel_size=2";
    assert_all_close(&base, &run_ranks(2, &[pp]), "PP=2");
    assert_all_close(
        &base,
        &run_ranks(4, &[pp, "model.tensor_model_parallel_size=2"]),
        "TP=2×PP=2",
    );
    assert_all_close(&base, &run_ranks(4, &[pp]), "PP=2×DP=2");
    // Under sequence parallelism the stages exchange their part of the sequence.
    let sp = ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"];
    assert_all_close(&base, &run_ranks(4, &[&sp[..], &[pp]].concat()), "TP=2 SP×PP=2");
}

#[test]
fn interleaved_pp2_vp2_matches_one_process() {
    let layers = "model.num_layers=4";
    let base = single(&[layers]);
    let vp = run_ranks(
        2,
        &[
            layers,
            "model.pipeline_model_parallel_size=2",
            "+model.virtual_pipeline_model_parallel_size=2",
        ],
    );
    assert_all_close(&base, &vp, "PP=2 VP=2");
    // Two micro-batch groups of 2 through each chunk; and VP with TP.
    let grouped = run_ranks(
        4,
        &[
            layers,
            "model.pipeline_model_parallel_size=2",
            "+model.virtual_pipeline_model_parallel_size=2",
            "model.tensor_model_parallel_size=2",
        ],
    );
    assert_all_close(&base, &grouped, "TP=2×PP=2 VP=2");
}

#[test]
fn uneven_stages_and_tied_embeddings_match_one_process() {
    let three = "model.num_layers=3";
    let base = single(&[three]);
    let uneven = run_ranks(
        2,
        &[
            three,
            "model.pipeline_model_parallel_size=2",
            "+model.num_layers_in_first_pipeline_stage=1",
            "+model.num_layers_in_last_pipeline_stage=2",
        ],
    );
    assert_all_close(&base, &uneven, "PP=2 with 1 + 2 layers");

    // Embedding and loss counted as layers: stage 0 = embedding + layer 0, stage 1 = layer 1
    // + loss. With tied embeddings the last stage's copy is kept in sync.
    let tied = "model.share_embeddings_and_output_weights=true";
    let base = single(&[tied]);
    let accounted = run_ranks(
        2,
        &[
            tied,
            "model.pipeline_model_parallel_size=2",
            "model.account_for_embedding_in_pipeline_split=true",
            "model.account_for_loss_in_pipeline_split=true",
        ],
    );
    assert_all_close(&base, &accounted, "PP=2 tied, embedding/loss accounted");
}

fn export(ckpt: &Path, out: &Path) -> HashMap<String, Tensor> {
    let opts = ExportOptions {
        checkpoint: ckpt.to_path_buf(),
        out: out.to_path_buf(),
        iteration: None,
        dtype: None,
        max_shard_bytes: u64::MAX,
        merge_lora: false,
        adapter_only: false,
    };
    let dir = export_hf(&opts).unwrap();
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn assert_same_weights(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    let mut names: Vec<_> = a.keys().collect();
    names.sort();
    let mut other: Vec<_> = b.keys().collect();
    other.sort();
    assert_eq!(names, other, "{what}: tensor names");
    for n in names {
        let (x, y) = (a[n].to_dtype(DType::F64).unwrap(), b[n].to_dtype(DType::F64).unwrap());
        let diff = (&x - &y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        let scale = x.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff <= 1e-5 * scale.max(1e-3), "{what}: {n} differs by {diff:e}");
    }
}

#[test]
fn pipeline_checkpoints_export_like_one_process_and_reshard() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let save = |i: usize| format!("+checkpoint.save={}", dirs[i].path().display());
    let load = |i: usize| format!("+checkpoint.load={}", dirs[i].path().display());
    let tied = "model.share_embeddings_and_output_weights=true";
    let pp = "model.pipeline_model_parallel_size=2";
    let tp = "model.tensor_model_parallel_size=2";

    // Full run at PP=1 and at TP=2×PP=2: the exported HF weights agree.
    let full = single(&[tied, &save(0)]);
    let tp_pp = run_ranks(4, &[tied, pp, tp, &save(1)]);
    assert_all_close(&full, &tp_pp, "TP=2×PP=2 tied");
    // Buckets reduced during backward, except the tied copies (summed over the embedding
    // group first).
    let overlap = ["ddp.overlap_grad_reduce=true", "++ddp.bucket_size=6000"];
    let pp_dp = run_ranks(4, &[&[tied, pp][..], &overlap[..]].concat());
    assert_all_close(&full, &pp_dp, "PP=2×DP=2 tied, overlapped reduction");
    assert!(dirs[1].path().join("iter_0000020/model/shard_tp01_pp01.safetensors").is_file());
    let out = tempfile::tempdir().unwrap();
    let one = export(dirs[0].path(), &out.path().join("one"));
    let four = export(dirs[1].path(), &out.path().join("four"));
    assert_same_weights(&one, &four, "export of TP=2×PP=2 vs TP=1/PP=1");

    let tail = |from: usize| TrainOutcome {
        losses: full.losses[from..].to_vec(),
        grad_norms: full.grad_norms[from..].to_vec(),
        ..full.clone()
    };
    // Save at PP=2, resume at PP=1: the loss continues as in the uninterrupted run.
    let first = run_ranks(2, &[tied, pp, "+train.exit_interval=8", &save(2)]);
    assert_eq!(first[0].final_step, 8);
    let resumed = single(&[tied, &save(2), &load(2)]);
    assert_close(&tail(8), &resumed, "PP=2 checkpoint resumed at PP=1");

    // Save at PP=1, resume at TP=2×PP=2.
    let first = single(&[tied, "+train.exit_interval=12", &save(3)]);
    assert_eq!(first.final_step, 12);
    let resumed = run_ranks(4, &[tied, pp, tp, &save(3), &load(3)]);
    assert_all_close(&tail(12), &resumed, "PP=1 checkpoint resumed at TP=2×PP=2");
}

#[test]
fn pipeline_evaluation_matches_one_process() {
    let eval = ["validation.eval_iters=2", "validation.eval_interval=10", "train.train_iters=10"];
    let base = single(&eval);
    let pp = run_ranks(2, &[&eval[..], &["model.pipeline_model_parallel_size=2"]].concat());
    let (want, got) = (base.last_validation_loss.unwrap(), pp[0].last_validation_loss.unwrap());
    assert!((want - got).abs() / want <= 1e-5, "validation loss {want} vs {got}");
    assert_eq!(pp[0].last_validation_loss, pp[1].last_validation_loss);
}

#[test]
fn activations_travel_in_pipeline_dtype() {
    let pp = "model.pipeline_model_parallel_size=2";
    let exact = run_ranks(2, &[pp]);
    let bf16 = run_ranks(2, &[pp, "model.pipeline_dtype=bf16"]);
    let pairs = exact[1].losses.iter().zip(&bf16[1].losses);
    let max_rel = pairs.map(|((_, x), (_, y))| (x - y).abs() / x).fold(0.0, f64::max);
    // bf16 rounding of the stage boundary shows in the curve, but only as rounding does.
    assert!(max_rel > 0.0 && max_rel < 1e-2, "f32 vs bf16 activations: max rel {max_rel:e}");
}

#[test]
fn lora_with_pipeline_and_tied_embeddings_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let tied = "model.share_embeddings_and_output_weights=true";
    single(&[tied, &format!("+checkpoint.save={}", base.display()), "train.train_iters=2"]);
    let pre = format!("checkpoint.pretrained_checkpoint={}", base.display());
    let peft = [tied, "+peft.dim=4", "+peft.alpha=8.0", "optimizer.lr=1e-2", pre.as_str()];
    let one = single(&peft);
    let pp = run_ranks(2, &[&peft[..], &["model.pipeline_model_parallel_size=2"]].concat());
    assert_all_close(&one, &pp, "LoRA PP=2 (frozen tied embedding)");
}

#[test]
fn pipeline_split_rules_are_megatron_cores() {
    let err = |extra: &[&str]| {
        let (loaded, _) = config(&[&["model.pipeline_model_parallel_size=2"], extra].concat());
        match finalize(loaded.cfg, Some(2), None) {
            Ok(_) => panic!("config must be refused: {extra:?}"),
            Err(e) => format!("{e:#}"),
        }
    };
    let e = err(&[
        "model.num_layers=4",
        "+model.num_layers_in_first_pipeline_stage=1",
        "model.account_for_loss_in_pipeline_split=true",
    ]);
    assert!(e.contains("cannot be combined with num_layers_in_first/last_pipeline_stage"), "{e}");
    let e = err(&[
        "model.num_layers=6",
        "+model.num_layers_in_first_pipeline_stage=1",
        "+model.num_layers_in_last_pipeline_stage=5",
        "+model.virtual_pipeline_model_parallel_size=2",
    ]);
    assert!(e.contains("1 layers per first pipeline stage are not divisible"), "{e}");
    // Interleaving needs at least PP micro-batches per group: 1 micro-batch of 8 is refused.
    let (loaded, toml) = config(&[
        "model.num_layers=4",
        "model.pipeline_model_parallel_size=2",
        "+model.virtual_pipeline_model_parallel_size=2",
        "train.micro_batch_size=8",
    ]);
    let e = LocalWorld::run(2, Duration::from_secs(60), |rank, lw| {
        let fin = finalize(loaded.cfg.clone(), Some(2), None)?;
        let topo = Topology::from_config(&fin.cfg.model, &fin.cfg.dist, 2)?;
        let groups = ProcessGroups::local(lw, topo, rank)?;
        Trainer::new_rank(fin, toml.clone(), Device::Cpu, Some(groups)).map(|_| ())
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("microbatch_group_size_per_vp_stage"), "{e:#}");
}
