//! The `mbridge` binary: commands, exit codes and bad input, end to end.

use assert_cmd::Command;
use predicates::prelude::*;

fn mbridge() -> Command {
    Command::cargo_bin("mbridge").unwrap()
}

#[test]
fn version_and_help() {
    mbridge().arg("--version").assert().success().stdout(predicate::str::contains("mbridge 0.1.0"));
    mbridge().args(["help", "config"]).assert().success().stdout(predicate::str::contains("show"));
    mbridge().arg("frobnicate").assert().code(2);
}

#[test]
fn recipes_list_and_show() {
    mbridge()
        .args(["recipes", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("llama3_8b"))
        .stdout(predicate::str::contains("qwen3_600m"))
        .stdout(predicate::str::contains("tiny_llama"));
    mbridge()
        .args(["recipes", "show", "llama3_8b"])
        .assert()
        .success()
        .stdout(predicate::str::contains("extends = [\"_common/pretrain\", \"models/llama3_8b\"]"));
    mbridge()
        .args(["recipes", "show", "llama3_8b/sft"])
        .assert()
        .success()
        .stdout(predicate::str::contains("_common/sft"));
}

#[test]
fn unknown_recipe_suggests_close_names() {
    mbridge()
        .args(["config", "show", "--recipe", "llama3_7b"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown recipe `llama3_7b`"))
        .stderr(predicate::str::contains("llama3_8b"));
}

#[test]
fn config_show_marks_sources() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("over.toml");
    std::fs::write(&file, "[logger]\nwandb_project = \"p\"\n[train]\nglobal_batch_size = 1024\n")
        .unwrap();
    let out = mbridge()
        .args(["config", "show", "--recipe", "llama3_8b", "--config-file"])
        .arg(&file)
        .args(["train.train_iters=10000", "optimizer.lr=1e-4", "~logger.wandb_project"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("train_iters = 10000  # override train.train_iters=10000"), "{out}");
    assert!(out.contains("global_batch_size = 1024  # file"), "{out}");
    assert!(out.contains("num_layers = 32  # recipe models/llama3_8b"), "{out}");
    assert!(out.contains("adam_beta2 = 0.95  # recipe _common/pretrain"), "{out}");
    assert!(out.contains("# wandb_project = (unset)  # override ~logger.wandb_project"), "{out}");
    assert!(out.contains("seed = 1234  # recipe _common/pretrain"), "{out}");
    assert!(out.contains("data_parallel_size = 1"), "{out}");
}

#[test]
fn config_show_only_changed() {
    let out = mbridge()
        .args(["config", "show", "--recipe", "tiny_llama", "--only-changed", "--no-sources"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("num_layers = 2"), "{out}");
    assert!(!out.contains("manual_gc"), "{out}");
    assert!(!out.contains("  # "), "{out}");
}

#[test]
fn config_show_output_round_trips_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let first = mbridge()
        .args(["config", "show", "--recipe", "qwen3_8b", "train.train_iters=77", "--no-sources"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let path = dir.path().join("resolved.toml");
    std::fs::write(&path, &first).unwrap();
    let second = mbridge()
        .args(["config", "show", "--no-sources", "--recipe"])
        .arg(&path)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert_eq!(String::from_utf8(first).unwrap(), String::from_utf8(second).unwrap());
}

#[test]
fn malformed_toml_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[train]\ntrain_iters = 10\nmicro_batch_size = = 2\n").unwrap();
    mbridge()
        .args(["config", "show", "--recipe"])
        .arg(&file)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("bad.toml"))
        .stderr(predicate::str::contains("line 3, column"));
}

#[test]
fn unknown_section_and_key_in_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(
        &file,
        "extends = \"tiny_llama/pretrain\"\n[trainer]\nx = 1\n[optimizer]\nlearning_rate = 1\n",
    )
    .unwrap();
    mbridge()
        .args(["config", "show", "--recipe"])
        .arg(&file)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown key `trainer`"))
        .stderr(predicate::str::contains("did you mean `train`"))
        .stderr(predicate::str::contains("unknown key `optimizer.learning_rate`"));
}

#[test]
fn recipe_inheritance_from_files_and_cycles() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.toml"),
        "extends = \"tiny_llama/pretrain\"\n[train]\ntrain_iters = 5\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("child.toml"),
        "extends = \"base.toml\"\n[optimizer]\nlr = 0.01\n",
    )
    .unwrap();
    mbridge()
        .args(["config", "show", "--recipe"])
        .arg(dir.path().join("child.toml"))
        .assert()
        .success()
        .stdout(predicate::str::contains("train_iters = 5  # recipe"))
        .stdout(predicate::str::contains("lr = 0.01  # recipe"));
    std::fs::write(dir.path().join("a.toml"), "extends = \"b.toml\"\n").unwrap();
    std::fs::write(dir.path().join("b.toml"), "extends = \"a.toml\"\n").unwrap();
    mbridge()
        .args(["config", "show", "--recipe"])
        .arg(dir.path().join("a.toml"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("inheritance cycle"));
    std::fs::write(dir.path().join("self.toml"), "extends = \"self.toml\"\n").unwrap();
    mbridge()
        .args(["config", "show", "--recipe"])
        .arg(dir.path().join("self.toml"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("inheritance cycle"));
}

#[test]
fn bad_overrides_exit_2() {
    mbridge()
        .args(["config", "show", "--recipe", "tiny_llama", "train.foo=1"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown key `train.foo`"));
    mbridge()
        .args(["config", "show", "--recipe", "tiny_llama", "~logger.wandb_project"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("nothing to delete"));
    mbridge()
        .args(["config", "show", "--recipe", "tiny_llama", "model.tensor_model_parallel_size=3"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "must be divisible by `model.tensor_model_parallel_size` (3)",
        ));
    mbridge()
        .args(["config", "show", "--recipe", "tiny_llama", "model.hidden_size=0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("`model.hidden_size` must be > 0"));
}

#[test]
fn pretrain_dry_run_prints_the_plan() {
    mbridge()
        .args(["pretrain", "--recipe", "llama3_8b", "--dry-run", "--world-size", "16"])
        .assert()
        .success()
        .stdout(predicate::str::contains("world 16 = TP 1 × PP 1 × CP 2 × DP 8"))
        .stdout(predicate::str::contains("global 512 = micro 1 × 64 micro-batches × DP 8"));
    mbridge()
        .args(["finetune", "--recipe", "llama3_8b", "--peft", "lora", "--dry-run"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("`peft` requires `checkpoint.pretrained_checkpoint`"));
}

#[test]
fn import_hf_of_an_uncached_repo_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    mbridge()
        .env("HF_HUB_CACHE", tmp.path())
        .env("HF_HOME", tmp.path())
        .env("HOME", tmp.path())
        .args(["import-hf", "meta-llama/Meta-Llama-3-8B", out.to_str().unwrap()])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not in the local Hugging Face cache"));
    assert!(!out.exists());
}
