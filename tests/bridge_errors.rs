//! Bad input to import-hf / export-hf: every case is a clear error naming the file or tensor,
//! and nothing is left behind under the output's parent directory.

use assert_cmd::Command;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model").join(name)
}

/// A copy of a fixture model directory that a test may break.
fn copy_fixture(name: &str, dest: &Path) -> PathBuf {
    std::fs::create_dir_all(dest).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dest.join(f)).unwrap();
    }
    dest.to_path_buf()
}

fn edit_weights(dir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    f(&mut w);
    candle_core::safetensors::save(&w, &path).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

/// Runs the command, expects exit `code`, and returns stderr.
fn fails(args: &[&str], code: i32) -> String {
    let out = Command::cargo_bin("mbridge").unwrap().args(args).assert().code(code);
    String::from_utf8(out.get_output().stderr.clone()).unwrap()
}

/// Imports `src` into `<tmp>/outs/ck`, expects failure with exit `code`, checks nothing was
/// left in `<tmp>/outs`, and returns stderr.
fn import_fails(tmp: &Path, src: &str, code: i32) -> String {
    let outs = tmp.join("outs");
    let err = fails(&["import-hf", src, outs.join("ck").to_str().unwrap()], code);
    if outs.exists() {
        let left: Vec<_> = std::fs::read_dir(&outs).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "partial output left behind: {left:?}\n{err}");
    }
    err
}

#[test]
fn missing_directory_and_missing_config() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_fails(tmp.path(), "/nonexistent/model-dir", 2);
    assert!(err.contains("/nonexistent/model-dir") && err.contains("no such directory"), "{err}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = import_fails(tmp.path(), empty.to_str().unwrap(), 1);
    assert!(err.contains("empty/config.json"), "{err}");
}

#[test]
fn malformed_config_json_names_the_file_and_what_was_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let src = copy_fixture("llama", &tmp.path().join("src"));
    std::fs::write(src.join("config.json"), "{ \"hidden_size\": 32,").unwrap();
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 1);
    assert!(err.contains("src/config.json") && err.contains("not valid JSON"), "{err}");
    std::fs::copy(fixture("llama").join("config.json"), src.join("config.json")).unwrap();
    edit_config(&src, |c| c["hidden_size"] = "big".into());
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 1);
    assert!(err.contains("`hidden_size` must be a non-negative integer"), "{err}");
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let src = copy_fixture("llama", &tmp.path().join("src"));
    edit_config(&src, |c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]));
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 2);
    assert!(err.contains("unsupported architecture `GPT2LMHeadModel`"), "{err}");
    for a in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"] {
        assert!(err.contains(a), "{err}");
    }
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = copy_fixture("qwen2", &tmp.path().join("a"));
    edit_weights(&src, |w| {
        w.remove("model.layers.1.mlp.up_proj.weight");
    });
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 1);
    assert!(err.contains("`model.layers.1.mlp.up_proj.weight` is missing"), "{err}");

    let src = copy_fixture("qwen2", &tmp.path().join("b"));
    edit_weights(&src, |w| {
        let k = w["model.layers.0.self_attn.k_proj.weight"].narrow(0, 0, 8).unwrap();
        w.insert("model.layers.0.self_attn.k_proj.weight".into(), k);
    });
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 1);
    assert!(
        err.contains("`model.layers.0.self_attn.k_proj.weight` has shape [8, 32]")
            && err.contains("[16, 32]"),
        "{err}"
    );

    let src = copy_fixture("qwen2", &tmp.path().join("c"));
    edit_weights(&src, |w| {
        let t = w["model.norm.weight"].clone();
        w.insert("model.layers.0.mlp.extra.weight".into(), t);
    });
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 1);
    assert!(err.contains("model.layers.0.mlp.extra.weight"), "{err}");
}

#[test]
fn truncated_safetensors_and_pickle_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = copy_fixture("llama", &tmp.path().join("a"));
    let path = src.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 1);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");

    let src = copy_fixture("llama", &tmp.path().join("b"));
    std::fs::remove_file(src.join("model.safetensors")).unwrap();
    std::fs::write(src.join("pytorch_model.bin"), b"not read").unwrap();
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 2);
    assert!(err.contains("pickle") && err.contains("safetensors"), "{err}");

    // An index naming a shard that is not there.
    let src = copy_fixture("llama", &tmp.path().join("c"));
    let index = serde_json::json!({"metadata": {}, "weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}});
    std::fs::rename(src.join("model.safetensors"), src.join("model-00001-of-00002.safetensors"))
        .unwrap();
    std::fs::write(src.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = import_fails(tmp.path(), src.to_str().unwrap(), 1);
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("does not exist"));
}

#[test]
fn non_empty_outputs_are_never_clobbered() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let src = fixture("llama");
    let err = fails(&["import-hf", src.to_str().unwrap(), out.to_str().unwrap()], 2);
    assert!(err.contains("already exists and is not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    // An empty directory is fine to fill; then export refuses the same non-empty target.
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    Command::cargo_bin("mbridge")
        .unwrap()
        .args(["import-hf", src.to_str().unwrap(), ck.to_str().unwrap()])
        .assert()
        .success();
    let err = fails(&["export-hf", ck.to_str().unwrap(), out.to_str().unwrap()], 2);
    assert!(err.contains("already exists and is not empty"), "{err}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary directories left: {left:?}");
}

#[test]
fn export_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let src = fixture("qwen3");
    Command::cargo_bin("mbridge")
        .unwrap()
        .args(["import-hf", src.to_str().unwrap(), ck.to_str().unwrap()])
        .assert()
        .success();
    let hf = tmp.path().join("hf");
    let (c, h) = (ck.to_str().unwrap(), hf.to_str().unwrap());
    let err = fails(&["export-hf", c, h, "--merge-lora"], 2);
    assert!(err.contains("no adapters in this checkpoint"), "{err}");
    let err = fails(&["export-hf", c, h, "--adapter-only"], 2);
    assert!(err.contains("no adapters in this checkpoint"), "{err}");
    let err = fails(&["export-hf", c, h, "--iteration", "7"], 1);
    assert!(err.contains("iter_0000007"), "{err}");
    let err = fails(&["export-hf", c, h, "--dtype", "fp8"], 2);
    assert!(err.contains("unknown dtype `fp8`"), "{err}");
    let missing = tmp.path().join("nope");
    let err = fails(&["export-hf", missing.to_str().unwrap(), h], 2);
    assert!(err.contains("nope") && err.contains("does not exist"), "{err}");
    assert!(!hf.exists());
    // A flipped byte in a shard's data (checksummed while the export is written) or a
    // truncated shard: the error names the file and nothing is published.
    let shard = ck.join("iter_0000000/model/shard_tp00_pp00.safetensors");
    let good = std::fs::read(&shard).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x01;
    std::fs::write(&shard, &bad).unwrap();
    let err = fails(&["export-hf", c, h], 1);
    assert!(err.contains("shard_tp00_pp00.safetensors") && err.contains("corrupted"), "{err}");
    std::fs::write(&shard, &good[..good.len() - 10]).unwrap();
    let err = fails(&["export-hf", c, h], 1);
    assert!(err.contains("shard_tp00_pp00.safetensors") && err.contains("truncated"), "{err}");
    assert!(!hf.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "only ck/ remains");
}

#[test]
fn temporaries_of_killed_conversions_are_cleaned_and_never_taken_for_output() {
    let tmp = tempfile::tempdir().unwrap();
    // What a conversion killed mid-write leaves: a hidden temporary, never the final name.
    let stale = tmp.path().join(".ck.mbridge-tmp-999999999");
    std::fs::create_dir_all(stale.join("iter_0000000")).unwrap();
    let ck = tmp.path().join("ck");
    let err =
        fails(&["export-hf", ck.to_str().unwrap(), tmp.path().join("hf").to_str().unwrap()], 2);
    assert!(err.contains("does not exist"), "{err}");
    Command::cargo_bin("mbridge")
        .unwrap()
        .args(["import-hf", fixture("llama").to_str().unwrap(), ck.to_str().unwrap()])
        .assert()
        .success();
    assert!(!stale.exists(), "stale temporary not removed");
    assert!(ck.join("iter_0000000/model/index.json").is_file());
}
