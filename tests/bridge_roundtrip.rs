//! HF bridge end to end through the binary: import → export is bit-identical for every fixture
//! family and layout, the imported checkpoint reproduces transformers' logits, `generate`
//! equals the no-cache oracle, and repo ids resolve through a local HF cache.

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use mbridge::bridge::load_checkpoint_model;
use mbridge::model::{generate_no_cache, ForwardOpts, GptModel, ParallelLayout};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FAMILIES: &[&str] = &["llama", "qwen2", "qwen3", "mistral"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model").join(name)
}

fn mbridge(args: &[&str]) -> String {
    let out = Command::cargo_bin("mbridge").unwrap().args(args).assert().success();
    String::from_utf8(out.get_output().stdout.clone()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Same names, dtypes, shapes and bytes.
fn assert_same_tensors(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    let mut ka: Vec<_> = a.keys().collect();
    let mut kb: Vec<_> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}: tensor names");
    for (k, t) in a {
        let u = &b[k];
        assert_eq!(t.dtype(), u.dtype(), "{what}: {k} dtype");
        assert_eq!(t.dims(), u.dims(), "{what}: {k} shape");
        let x = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let y = u.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{what}: {k} values");
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every config.json field of the source is written back with the same value (export adds
/// `architectures` and `dtype`, which a bare config may lack).
fn assert_config_round_trip(src: &Value, out: &Value, what: &str) {
    for (k, v) in src.as_object().unwrap() {
        assert_eq!(&out[k], v, "{what}: config.json `{k}`");
    }
}

fn import_export(name: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let hf = tmp.path().join("hf");
    let src = fixture(name);
    let mut args = vec!["import-hf", s(&src), s(&ck)];
    args.extend_from_slice(extra);
    mbridge(&args);
    mbridge(&["export-hf", s(&ck), s(&hf)]);
    (tmp, ck, hf)
}

#[test]
fn import_export_is_bit_identical_for_every_family_and_layout() {
    for name in FAMILIES {
        let src = fixture(name);
        let original = load(&src.join("model.safetensors"));
        let src_cfg = json(&src.join("config.json"));
        for layout in [&[][..], &["--tp", "2"][..], &["--tp", "2", "--pp", "2"][..]] {
            let what = format!("{name} {layout:?}");
            let (_tmp, _ck, hf) = import_export(name, layout);
            assert_same_tensors(&load(&hf.join("model.safetensors")), &original, &what);
            assert_config_round_trip(&src_cfg, &json(&hf.join("config.json")), &what);
        }
    }
}

#[test]
fn vocab_padding_is_added_on_import_and_removed_on_export() {
    // Llama fixture: V = 100. The HF rule keeps it at TP=1 (divisor 4) and pads to 104 at TP=2.
    for (args, rows) in [
        (&[][..], 100usize),
        (&["--tp", "2"][..], 104),
        (&["--make-vocab-size-divisible-by", "128"][..], 128),
    ] {
        let (_tmp, ck, hf) = import_export("llama", args);
        let iter = ck.join("iter_0000000");
        let index = json(&iter.join("model/index.json"));
        let shape = &index["tensors"]["embedding.word_embeddings.weight"]["shape"];
        assert_eq!(shape[0].as_u64().unwrap() as usize, rows, "{args:?}");
        let got = load_checkpoint_model(&ck, None, DType::F32, &Device::Cpu).unwrap();
        let emb = got.model.params().get("embedding.word_embeddings.weight").unwrap();
        let padding = emb.var.as_tensor().narrow(0, 100, rows - 100).unwrap();
        assert_eq!(padding.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let out = load(&hf.join("model.safetensors"));
        assert_eq!(out["model.embed_tokens.weight"].dims(), &[100, 32], "{args:?}");
        assert_eq!(out["lm_head.weight"].dims(), &[100, 32], "{args:?}");
        assert_eq!(json(&hf.join("config.json"))["vocab_size"], 100);
        // The run config pads the same way when a trainer finalizes it.
        let toml = std::fs::read_to_string(iter.join("run_config.toml")).unwrap();
        assert!(toml.contains("should_pad_vocab = true"), "{toml}");
    }
}

#[test]
fn imported_checkpoint_reproduces_transformers_logits() {
    for name in FAMILIES {
        for layout in [&[][..], &["--tp", "2", "--pp", "2"][..]] {
            let tmp = tempfile::tempdir().unwrap();
            let ck = tmp.path().join("ck");
            let src = fixture(name);
            let mut args = vec!["import-hf", s(&src), s(&ck)];
            args.extend_from_slice(layout);
            mbridge(&args);
            let got = load_checkpoint_model(&ck, None, DType::F32, &Device::Cpu).unwrap();
            let r = load(&fixture(name).join("logits.safetensors"));
            let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
            let want = &r["logits"];
            let v = want.dim(2).unwrap();
            let logits = got.model.forward(&ids, &ForwardOpts::default()).unwrap();
            let logits = logits.narrow(2, 0, v).unwrap();
            let diff = (logits - want).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-4 * scale.max(1.0), "{name} {layout:?}: max |Δlogit| {diff}");
        }
    }
}

#[test]
fn load_hf_weights_fills_a_model_like_import() {
    for name in FAMILIES {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("ck");
        mbridge(&["import-hf", s(&fixture(name)), s(&ck)]);
        let imported = load_checkpoint_model(&ck, None, DType::F32, &Device::Cpu).unwrap();
        let mut cfg = imported.cfg.model.clone();
        cfg.vocab_size = Some(imported.model.arch().vocab);
        let model =
            GptModel::new(&cfg, ParallelLayout::single(), 99, DType::F32, &Device::Cpu).unwrap();
        mbridge::bridge::load_hf_weights(&fixture(name), &model).unwrap();
        let a: HashMap<String, Tensor> =
            model.params().local_state().unwrap().into_iter().collect();
        let b: HashMap<String, Tensor> =
            imported.model.params().local_state().unwrap().into_iter().collect();
        assert_same_tensors(&a, &b, name);
    }
}

#[test]
fn generate_through_the_binary_equals_the_no_cache_oracle() {
    for name in ["llama", "qwen3"] {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("ck");
        mbridge(&["import-hf", s(&fixture(name)), s(&ck), "--tp", "2"]);
        let out =
            mbridge(&["generate", s(&ck), "--prompt-ids", "5 17 3 42", "--max-new-tokens", "8"]);
        let got: Vec<u32> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
        let loaded = load_checkpoint_model(&ck, None, DType::F32, &Device::Cpu).unwrap();
        // NullTokenizer fallback (the fixtures ship no tokenizer): EOD = V - 1.
        let eod = json(&fixture(name).join("config.json"))["vocab_size"].as_u64().unwrap() - 1;
        let want = generate_no_cache(&loaded.model, &[5, 17, 3, 42], 8, Some(eod as u32)).unwrap();
        assert!(!got.is_empty(), "{name}: no tokens printed: {out:?}");
        assert_eq!(got, want, "{name}");
        // --prompt goes through the tokenizer: NullTokenizer text is ids.
        let out2 = mbridge(&["generate", s(&ck), "--prompt", "5 17 3 42", "--max-new-tokens", "8"]);
        assert_eq!(out, out2);
    }
}

/// Builds `root/models--org--name/snapshots/<rev>/` with `refs/main`, as huggingface_hub does.
fn fake_cache(root: &Path, repo: &str, src: &Path) {
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let base = root.join(format!("models--{}", repo.replace('/', "--")));
    let snap = base.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), rev).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
}

#[test]
fn repo_ids_resolve_through_the_local_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    fake_cache(&cache, "tiny-org/tiny-qwen2", &fixture("qwen2"));
    let ck = tmp.path().join("ck");
    Command::cargo_bin("mbridge")
        .unwrap()
        .env("HF_HUB_CACHE", &cache)
        .args(["import-hf", "tiny-org/tiny-qwen2", s(&ck)])
        .assert()
        .success();
    let src = json(&ck.join("iter_0000000/hf_source.json"));
    assert_eq!(src["repo_id"], "tiny-org/tiny-qwen2");
    assert_eq!(src["revision"], "0123456789abcdef0123456789abcdef01234567");
    // HF_HOME/hub is the fallback root.
    let ck2 = tmp.path().join("ck2");
    Command::cargo_bin("mbridge")
        .unwrap()
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", tmp.path())
        .args(["import-hf", "tiny-org/tiny-qwen2", s(&ck2)])
        .assert()
        .success();
    // Offline (HF_HUB_OFFLINE), an uncached repo is a clear error naming what is missing and
    // where it looked; nothing is written and no download is tried.
    let ck3 = tmp.path().join("ck3");
    let offline_import = |repo: &str, out: &Path| {
        let out = Command::cargo_bin("mbridge")
            .unwrap()
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .args(["import-hf", repo, s(out)])
            .assert()
            .failure();
        String::from_utf8(out.get_output().stderr.clone()).unwrap()
    };
    let err = offline_import("meta-llama/Meta-Llama-3-8B", &ck3);
    assert!(err.contains("not in the local Hugging Face cache"), "{err}");
    assert!(err.contains("config.json and the safetensors weights"), "{err}");
    assert!(err.contains("models--meta-llama--Meta-Llama-3-8B"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(!ck3.exists());
    // A partly cached repo (an index naming a shard that was never fetched) lists the file.
    fake_cache(&cache, "tiny-org/partial", &fixture("qwen2"));
    let snap =
        cache.join("models--tiny-org--partial/snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    std::fs::write(
        snap.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(snap.join("model-00001-of-00002.safetensors"), b"").unwrap();
    let err = offline_import("tiny-org/partial", &ck3);
    assert!(err.contains("model-00002-of-00002.safetensors missing from"), "{err}");
    assert!(!err.contains("model-00001-of-00002.safetensors,"), "{err}");
    assert!(!ck3.exists());
}

#[test]
fn dry_run_prints_the_mapping_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let out = mbridge(&["import-hf", s(&fixture("qwen3")), s(&ck), "--dry-run", "--tp", "2"]);
    assert!(out.contains("decoder.layers.1.self_attention.q_layernorm.weight"), "{out}");
    assert!(out.contains("model.layers.1.self_attn.q_norm.weight [16]"), "{out}");
    assert!(out.contains("fused-qkv"), "{out}");
    assert!(out.contains("gated-mlp"), "{out}");
    assert!(!ck.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn tokenizer_files_travel_through_import_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama").join(f), src.join(f)).unwrap();
    }
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tok");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), src.join(f)).unwrap();
    }
    std::fs::write(src.join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": 2}"#)
        .unwrap();
    let (ck, hf) = (tmp.path().join("ck"), tmp.path().join("hf"));
    mbridge(&["import-hf", s(&src), s(&ck)]);
    let iter = ck.join("iter_0000000");
    let toml = std::fs::read_to_string(iter.join("run_config.toml")).unwrap();
    assert!(toml.contains("tokenizer_type = \"HuggingFaceTokenizer\""), "{toml}");
    let tok_dir = iter.join("tokenizer");
    assert!(toml.contains(&format!("tokenizer_model = \"{}\"", tok_dir.display())), "{toml}");
    mbridge(&["export-hf", s(&ck), s(&hf)]);
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let a = std::fs::read(src.join(f)).unwrap();
        assert_eq!(a, std::fs::read(tok_dir.join(f)).unwrap(), "{f} in checkpoint");
        assert_eq!(a, std::fs::read(hf.join(f)).unwrap(), "{f} in export");
    }
    // generate decodes with the checkpoint's own tokenizer.
    let out = mbridge(&["generate", s(&ck), "--prompt-ids", "5 17 3", "--max-new-tokens", "4"]);
    assert!(!out.trim().is_empty());
}

#[test]
fn dtype_conversion_on_import_and_export() {
    let (_tmp, ck, hf) = import_export("qwen2", &["--dtype", "bf16"]);
    let index = json(&ck.join("iter_0000000/model/index.json"));
    assert_eq!(index["tensors"]["decoder.final_layernorm.weight"]["dtype"], "BF16");
    let out = load(&hf.join("model.safetensors"));
    let want: HashMap<String, Tensor> = load(&fixture("qwen2").join("model.safetensors"))
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    assert_same_tensors(&out, &want, "bf16");
    assert_eq!(json(&hf.join("config.json"))["dtype"], "bfloat16");
    let hf32 = ck.parent().unwrap().join("hf32");
    mbridge(&["export-hf", s(&ck), s(&hf32), "--dtype", "fp32"]);
    assert_eq!(load(&hf32.join("model.safetensors"))["model.norm.weight"].dtype(), DType::F32);
}

#[test]
fn exports_shard_by_size_with_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (ck, hf) = (tmp.path().join("ck"), tmp.path().join("hf"));
    mbridge(&["import-hf", s(&fixture("mistral")), s(&ck)]);
    mbridge(&["export-hf", s(&ck), s(&hf), "--max-shard-size-gb", "0.00002"]);
    let index = json(&hf.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let mut all = HashMap::new();
    let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() > 2, "{files:?}");
    for f in files {
        all.extend(load(&hf.join(f)));
    }
    assert_eq!(map.len(), all.len());
    assert_same_tensors(&all, &load(&fixture("mistral").join("model.safetensors")), "sharded");
}

#[test]
fn run_config_finalizes_to_the_checkpoint_vocab() {
    use mbridge::config::{finalize, load as load_config, ConfigRequest};
    let (_tmp, ck, _hf) = import_export("llama", &["--tp", "2"]);
    let rc = ck.join("iter_0000000/run_config.toml");
    // A finetune run adds its training settings on top of the imported config.
    let overrides = ["train.micro_batch_size=1", "train.train_iters=1", "optimizer.lr=1e-4"];
    let req = ConfigRequest {
        recipe: Some(s(&rc).to_string()),
        overrides: overrides.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    let loaded = load_config(&req).unwrap();
    let fin = finalize(loaded.cfg, Some(2), None).unwrap();
    assert_eq!(fin.derived.padded_vocab_size, Some(104));
    assert_eq!(fin.cfg.model.tensor_model_parallel_size, 2);
}

#[test]
fn a_pretraining_run_exports_and_reimports_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let save = format!("checkpoint.save={}", s(&run));
    mbridge(&["pretrain", "--recipe", "tiny_llama", "train.train_iters=2", &save]);
    let (hf, ck, hf2) = (tmp.path().join("hf"), tmp.path().join("ck"), tmp.path().join("hf2"));
    mbridge(&["export-hf", s(&run), s(&hf)]);
    // No source config.json in a pretraining run: transformers-4 style, NullTokenizer vocab.
    let cfg = json(&hf.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert!(cfg.get("rope_theta").is_some() && cfg.get("rope_parameters").is_none());
    assert_eq!(cfg["vocab_size"], 256);
    mbridge(&["import-hf", s(&hf), s(&ck), "--tp", "2"]);
    mbridge(&["export-hf", s(&ck), s(&hf2)]);
    assert_same_tensors(
        &load(&hf2.join("model.safetensors")),
        &load(&hf.join("model.safetensors")),
        "re-export",
    );
    assert_config_round_trip(&cfg, &json(&hf2.join("config.json")), "re-export");
    let args = ["--prompt-ids", "1 2 3", "--max-new-tokens", "6", "--ignore-eod"];
    let a = mbridge(&[&["generate", s(&run)][..], &args].concat());
    let b = mbridge(&[&["generate", s(&ck)][..], &args].concat());
    assert_eq!(a, b);
}

#[test]
fn load_hf_weights_fills_one_tp_rank_and_rejects_other_architectures() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    mbridge(&["import-hf", s(&fixture("llama")), s(&ck), "--tp", "2"]);
    let imported = load_checkpoint_model(&ck, None, DType::F32, &Device::Cpu).unwrap();
    let mut cfg = imported.cfg.model.clone();
    cfg.vocab_size = Some(104);
    let layout = ParallelLayout { tp_rank: 1, tp_size: 2, pp_rank: 0, pp_size: 1 };
    let model = GptModel::new(&cfg, layout, 5, DType::F32, &Device::Cpu).unwrap();
    mbridge::bridge::load_hf_weights(&fixture("llama"), &model).unwrap();
    let got: HashMap<String, Tensor> = model.params().local_state().unwrap().into_iter().collect();
    let shard = load(&ck.join("iter_0000000/model/shard_tp01_pp00.safetensors"));
    assert_same_tensors(&got, &shard, "tp rank 1");

    let other = GptModel::new(&cfg, ParallelLayout::single(), 5, DType::F32, &Device::Cpu).unwrap();
    let err = mbridge::bridge::load_hf_weights(&fixture("qwen3"), &other).unwrap_err().to_string();
    assert!(err.contains("qwen3/config.json") && err.contains("qk_layernorm"), "{err}");
}

#[test]
fn training_checkpoints_carry_the_run_tokenizer_into_export() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tok");
    let pretrain = |run: &Path, extra: &[&str]| {
        let save = format!("checkpoint.save={}", s(run));
        let mut args = vec!["pretrain", "--recipe", "tiny_llama", "train.train_iters=2", &save];
        args.extend_from_slice(extra);
        mbridge(&args);
    };
    // An HF tokenizer (given as its tokenizer.json): the file and the config beside it.
    let run = tmp.path().join("run");
    let model = format!("tokenizer.tokenizer_model={}", s(&tok.join("tokenizer.json")));
    pretrain(
        &run,
        &["tokenizer.tokenizer_type=HuggingFaceTokenizer", &model, "~tokenizer.vocab_size"],
    );
    let saved = run.join("iter_0000002/tokenizer");
    let mut names: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["tokenizer.json", "tokenizer_config.json"]);
    let hf = tmp.path().join("hf");
    mbridge(&["export-hf", s(&run), s(&hf)]);
    for f in &names {
        let a = std::fs::read(tok.join(f)).unwrap();
        assert_eq!(a, std::fs::read(saved.join(f)).unwrap(), "{f} in checkpoint");
        assert_eq!(a, std::fs::read(hf.join(f)).unwrap(), "{f} in export");
    }
    // GPT-2 BPE: vocab and merges; none with save_tokenizer_assets=false.
    let bpe = [
        "tokenizer.tokenizer_type=GPT2BPETokenizer".to_string(),
        format!("tokenizer.vocab_file={}", s(&tok.join("vocab.json"))),
        format!("tokenizer.merge_file={}", s(&tok.join("merges.txt"))),
        "~tokenizer.vocab_size".to_string(),
    ];
    let bpe: Vec<&str> = bpe.iter().map(String::as_str).collect();
    let run2 = tmp.path().join("run2");
    pretrain(&run2, &bpe);
    for f in ["vocab.json", "merges.txt"] {
        let a = std::fs::read(tok.join(f)).unwrap();
        assert_eq!(a, std::fs::read(run2.join("iter_0000002/tokenizer").join(f)).unwrap(), "{f}");
    }
    let run3 = tmp.path().join("run3");
    pretrain(&run3, &[&bpe[..], &["checkpoint.save_tokenizer_assets=false"]].concat());
    assert!(run3.join("iter_0000002/train_state.json").is_file());
    assert!(!run3.join("iter_0000002/tokenizer").exists());
}
