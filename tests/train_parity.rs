//! Loss-curve parity with a PyTorch reference: 30 iterations of the tiny Llama recipe (AdamW,
//! cosine schedule with warmup, global-norm clipping that bites, 4 micro-batches per global
//! batch, EOD-masked loss so micro-batches differ in loss-token count) must give the same
//! per-iteration `lm loss`, grad norm and learning rate as transformers' `LlamaForCausalLM`
//! trained by torch's AdamW under megatron-core's `OptimizerParamScheduler`, within 1e-4
//! relative.
//!
//! The reference (`tests/fixtures/train/parity.json`) is made in two steps:
//!
//! ```text
//! MBRIDGE_PARITY_DUMP=/tmp/parity cargo test --test train_parity -- --ignored dump
//! /work/pyenv/bin/python scripts/fixtures/train_parity.py /tmp/parity
//! ```
//!
//! The first writes mbridge's initial weights under HF names (`init.safetensors`, not
//! committed: the test re-creates them from `rng.seed`) and the exact micro-batches the sampler
//! serves; the script trains on them in fp32 and writes the fixture with the batches' token ids,
//! the resolved hyper-parameters and the per-iteration results. The test checks that mbridge
//! still serves those very batches, then trains through [`Trainer`] and compares.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use mbridge::bridge::mapping::export_to_hf_state;
use mbridge::config::recipes::Task;
use mbridge::config::show::{render, ShowOptions};
use mbridge::config::{finalize, load, ConfigRequest, Finalized};
use mbridge::data::sampler::{collate, Batch, PretrainingSampler};
use mbridge::train::datasets::{build_pretrain_datasets, tokenizer_from_config};
use mbridge::train::trainer::{TrainOutcome, Trainer};
use serde_json::{json, Value};

/// Per-step relative tolerance on loss, grad norm and learning rate (the issue's bar).
const RTOL: f64 = 1e-4;

/// Overrides of the `tiny_llama` recipe shared by every case. Grad norms run ≈ 0.6–0.95, so
/// clipping at 0.8 bites in most early iterations and rarely later (the test checks that both
/// happen); warmup covers 5 of 30 iterations; 4 micro-batches of 2 per iteration.
const COMMON: &[&str] = &[
    "train.train_iters=30",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "validation.eval_iters=0",
    "optimizer.lr=3e-3",
    "optimizer.min_lr=3e-4",
    "optimizer.weight_decay=0.1",
    "optimizer.adam_beta1=0.9",
    "optimizer.adam_beta2=0.95",
    "optimizer.adam_eps=1e-8",
    "optimizer.clip_grad=0.8",
    "scheduler.lr_decay_style=cosine",
    "scheduler.lr_warmup_iters=5",
    "dataset.eod_mask_loss=true",
    "logger.log_interval=1000",
];

/// The two gradient normalisations of megatron-core (`model.calculate_per_token_loss`).
const CASES: &[(&str, &[&str])] = &[
    ("mean_of_microbatch_means", &["model.calculate_per_token_loss=false"]),
    ("per_token", &["model.calculate_per_token_loss=true"]),
];

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/parity.json")
}

fn overrides(case: &[&str], extra: &[&str]) -> Vec<String> {
    COMMON.iter().chain(case).chain(extra).map(|s| s.to_string()).collect()
}

fn config(overrides: &[String]) -> (Finalized, String) {
    let req = ConfigRequest {
        recipe: Some("tiny_llama".into()),
        task: Some(Task::Pretrain),
        overrides: overrides.to_vec(),
        ..Default::default()
    };
    let loaded = load(&req).unwrap();
    let fin = finalize(loaded.cfg.clone(), None, None).unwrap();
    let toml = render(&loaded.cfg, &loaded.raw, None, ShowOptions::default());
    (fin, toml)
}

fn train(overrides: &[String]) -> TrainOutcome {
    let (fin, toml) = config(overrides);
    Trainer::new(fin, toml, Device::Cpu).unwrap().train().unwrap()
}

/// The micro-batches of every iteration, built the way [`Trainer::train`] builds them.
fn batches(overrides: &[String]) -> Vec<Vec<Batch>> {
    let (fin, _) = config(overrides);
    let tok = tokenizer_from_config(&fin.cfg).unwrap();
    let fin = finalize(fin.cfg, Some(fin.derived.world_size), Some(tok.vocab_size())).unwrap();
    let d = &fin.derived;
    let [train_ds, _, _] = build_pretrain_datasets(&fin.cfg, d, tok.as_ref()).unwrap();
    let train_ds = train_ds.unwrap();
    let mut sampler = PretrainingSampler::new(
        train_ds.len(),
        0,
        d.micro_batch_size,
        0,
        d.data_parallel_size,
        true,
        false,
    )
    .unwrap();
    (0..d.train_iters)
        .map(|_| {
            (0..d.num_microbatches)
                .map(|_| collate(&train_ds, &sampler.next().unwrap()).unwrap())
                .collect()
        })
        .collect()
}

/// Rows of a micro-batch as `(text, mask)`: `text` = tokens + the last label (the sample's
/// `seq_length + 1` ids, as GPTDataset cuts them) and the loss mask as a '0'/'1' string.
fn rows(b: &Batch) -> Vec<(Vec<i64>, String)> {
    let s = b.seq_length;
    (0..b.batch_size)
        .map(|r| {
            let (t, l) = (&b.tokens[r * s..(r + 1) * s], &b.labels[r * s..(r + 1) * s]);
            assert_eq!(&t[1..], &l[..s - 1], "labels are not the tokens shifted by one");
            let pos = &b.position_ids[r * s..(r + 1) * s];
            assert!(pos.iter().enumerate().all(|(i, &p)| p == i as i64), "positions not 0..s");
            let mut text = t.to_vec();
            text.push(l[s - 1]);
            let mask = b.loss_mask[r * s..(r + 1) * s]
                .iter()
                .map(|&m| if m == 1.0 { '1' } else { '0' })
                .collect();
            (text, mask)
        })
        .collect()
}

/// All rows of all iterations, iteration-major, then micro-batch, then row.
fn flat_rows(batches: &[Vec<Batch>]) -> Vec<(Vec<i64>, String)> {
    batches.iter().flatten().flat_map(rows).collect()
}

/// Writes what `scripts/fixtures/train_parity.py` needs into `$MBRIDGE_PARITY_DUMP`.
#[test]
#[ignore = "writes the PyTorch reference's inputs; run by hand to regenerate the fixture"]
fn dump_reference_inputs() {
    let dir = PathBuf::from(std::env::var("MBRIDGE_PARITY_DUMP").expect("set MBRIDGE_PARITY_DUMP"));
    std::fs::create_dir_all(&dir).unwrap();
    let ov = overrides(CASES[0].1, &[]);
    let (fin, toml) = config(&ov);
    let trainer = Trainer::new(fin, toml, Device::Cpu).unwrap();
    let cfg = trainer.config();
    let model = trainer.model();
    let arch = model.arch();
    // Full padded vocabulary: the padded rows are trained (and decayed) in Megatron too.
    let hf = export_to_hf_state(model, arch.vocab).unwrap();
    candle_core::safetensors::save(&hf, dir.join("init.safetensors")).unwrap();
    let all = batches(&ov);
    for (name, case) in &CASES[1..] {
        assert_eq!(flat_rows(&batches(&overrides(case, &[]))), flat_rows(&all), "{name}");
    }
    let (text, mask): (Vec<_>, Vec<_>) = flat_rows(&all).into_iter().unzip();
    let m = &cfg.model;
    let o = &cfg.optimizer;
    let s = &cfg.scheduler;
    let d = json!({
        "common_overrides": COMMON,
        "cases": CASES.iter().map(|(n, c)| json!({"name": n, "overrides": c})).collect::<Vec<_>>(),
        "hf_config": {
            "vocab_size": arch.vocab,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups,
            "max_position_embeddings": m.seq_length,
            "rms_norm_eps": m.layernorm_epsilon,
            "rope_theta": m.rotary_base,
            "tie_word_embeddings": m.share_embeddings_and_output_weights,
        },
        "train": {
            "train_iters": cfg.train.train_iters,
            "global_batch_size": cfg.train.global_batch_size,
            "micro_batch_size": cfg.train.micro_batch_size,
            "seq_length": m.seq_length,
        },
        "optimizer": {
            "lr": o.lr, "min_lr": o.min_lr, "weight_decay": o.weight_decay,
            "adam_beta1": o.adam_beta1, "adam_beta2": o.adam_beta2, "adam_eps": o.adam_eps,
            "clip_grad": o.clip_grad,
        },
        "scheduler": {
            "lr_warmup_iters": s.lr_warmup_iters, "lr_warmup_init": s.lr_warmup_init,
            "lr_decay_style": s.lr_decay_style,
        },
        "batches": {"text": text, "loss_mask": mask},
    });
    std::fs::write(dir.join("inputs.json"), serde_json::to_string(&d).unwrap()).unwrap();
    eprintln!("wrote {}", dir.display());
}

/// Reference values of one case: name → (loss, grad_norm, lr) per iteration.
type Reference = HashMap<String, [Vec<f64>; 3]>;

fn load_fixture(path: &Path) -> (Value, Reference) {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let f = |c: &Value, k: &str| -> Vec<f64> {
        c[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let refs = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            (name, [f(c, "loss"), f(c, "grad_norm"), f(c, "lr")])
        })
        .collect();
    (v, refs)
}

/// Largest relative difference per quantity, and the first iteration (1-based) over `RTOL`.
fn compare(out: &TrainOutcome, want: &[Vec<f64>; 3]) -> ([f64; 3], Option<(usize, &'static str)>) {
    let got: [Vec<f64>; 3] = [
        out.losses.iter().map(|&(_, l)| l).collect(),
        out.grad_norms.iter().map(|&(_, g)| g.expect("no iteration is skipped")).collect(),
        out.lrs.iter().map(|&(_, l)| l).collect(),
    ];
    let names = ["loss", "grad norm", "lr"];
    let mut max = [0.0f64; 3];
    let mut first_bad = None;
    for q in 0..3 {
        assert_eq!(got[q].len(), want[q].len(), "{}: iteration count", names[q]);
        for (i, (g, w)) in got[q].iter().zip(&want[q]).enumerate() {
            let rel = (g - w).abs() / w.abs();
            max[q] = max[q].max(rel);
            let within = rel <= RTOL; // false for NaN too
            if !within && first_bad.is_none_or(|(it, _)| i + 1 < it) {
                first_bad = Some((i + 1, names[q]));
            }
        }
    }
    (max, first_bad)
}

#[test]
fn thirty_steps_match_pytorch() {
    let (fixture, refs) = load_fixture(&fixture_path());
    let common: Vec<&str> = fixture["common_overrides"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(common, COMMON, "fixture made with other overrides: regenerate it");
    // mbridge must still serve exactly the batches the reference trained on.
    let want_text: Vec<Vec<i64>> =
        serde_json::from_value(fixture["batches"]["text"].clone()).unwrap();
    let want_mask: Vec<String> =
        serde_json::from_value(fixture["batches"]["loss_mask"].clone()).unwrap();
    let (text, mask): (Vec<_>, Vec<_>) =
        flat_rows(&batches(&overrides(CASES[0].1, &[]))).into_iter().unzip();
    assert_eq!(text, want_text, "token ids differ from the reference's batches");
    assert_eq!(mask, want_mask, "loss masks differ from the reference's batches");
    let masked: usize = mask.iter().map(|m| m.matches('0').count()).sum();
    assert!(masked > 0, "no EOD-masked token: the micro-batch weighting is not exercised");

    let mut outcomes = HashMap::new();
    for (name, case) in CASES {
        let want = &refs[*name];
        let out = train(&overrides(case, &[]));
        let (max, bad) = compare(&out, want);
        eprintln!(
            "{name}: max relative diff: loss {:.2e}, grad norm {:.2e}, lr {:.2e}",
            max[0], max[1], max[2]
        );
        assert!(
            bad.is_none(),
            "{name}: {} differs by more than {RTOL} at iteration {}",
            bad.unwrap().1,
            bad.unwrap().0
        );
        // Clipping must bite in some iterations and not in others, or the test proves less.
        let clip = fixture["optimizer"]["clip_grad"].as_f64().unwrap();
        let clipped = want[1].iter().filter(|&&g| g > clip).count();
        assert!(clipped > 0 && clipped < want[1].len(), "{name}: clipped {clipped} of 30");
        outcomes.insert(*name, out);
    }

    // The comparison is sharp: without clipping, or with the other loss normalisation, it fails.
    let out = train(&overrides(CASES[0].1, &["optimizer.clip_grad=0.0"]));
    assert!(compare(&out, &refs[CASES[0].0]).1.is_some(), "parity holds without clipping");
    let other = &outcomes[CASES[1].0];
    assert!(compare(other, &refs[CASES[0].0]).1.is_some(), "the loss normalisation is not seen");
}
