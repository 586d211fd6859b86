//! Real data end to end: preprocess JSONL → inspect samples → pretrain on the blend.

use assert_cmd::Command;
use predicates::prelude::*;

fn mbridge() -> Command {
    Command::cargo_bin("mbridge").unwrap()
}

#[test]
fn preprocess_show_and_pretrain_on_a_blend() {
    let dir = tempfile::tempdir().unwrap();
    // Documents of counting sequences: learnable, and NullTokenizer reads ids directly.
    let mut corpus = String::new();
    for d in 0..200 {
        let start = (d * 7) % 200;
        let ids: Vec<String> =
            (0..(30 + d % 50)).map(|i| ((start + i) % 250).to_string()).collect();
        corpus += &format!("{{\"text\": \"{}\"}}\n", ids.join(" "));
    }
    let input = dir.path().join("corpus.jsonl");
    std::fs::write(&input, corpus).unwrap();
    let prefix = dir.path().join("my");
    mbridge()
        .args(["preprocess-data", "--input"])
        .arg(&input)
        .args([
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "255",
            "--append-eod",
            "--output-prefix",
        ])
        .arg(&prefix)
        .assert()
        .success();
    let data = format!("{}_text_document", prefix.display());
    assert!(std::path::Path::new(&format!("{data}.bin")).is_file());
    let blend = format!("+dataset.blend=[\"{data}\"]");
    mbridge()
        .args([
            "data",
            "show-samples",
            "--recipe",
            "tiny_llama",
            &blend,
            "+dataset.split=\"90,5,5\"",
            "--count",
            "2",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("--- sample 1"))
        .stdout(predicate::str::contains("loss_mask sum 64"));
    let out = mbridge()
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            &blend,
            "+dataset.split=\"90,5,5\"",
            "train.train_iters=20",
            "logger.log_interval=10",
            "validation.eval_interval=10",
        ])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("data: Pretraining"), "{out}");
    assert!(out.contains("iteration       20/      20"), "{out}");
    assert!(out.contains("validation loss at iteration 10 on validation set"), "{out}");
    // A blend whose files are missing fails with the path named.
    mbridge()
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "+dataset.blend=[\"/nonexistent/x\"]",
            "+dataset.split=\"1,0,0\"",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("/nonexistent/x"));
}
