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

/// A preprocessed corpus of counting documents (ids below 255) at `dir/<name>_text_document`;
/// `step` makes corpora differ.
fn corpus(dir: &std::path::Path, name: &str, docs: usize, step: usize) -> String {
    let mut text = String::new();
    for d in 0..docs {
        let start = (d * 7) % 200;
        let ids: Vec<String> =
            (0..(30 + d % 50)).map(|i| ((start + i * step) % 250).to_string()).collect();
        text += &format!("{{\"text\": \"{}\"}}\n", ids.join(" "));
    }
    let input = dir.join(format!("{name}.jsonl"));
    std::fs::write(&input, text).unwrap();
    let prefix = dir.join(name);
    mbridge()
        .args(["preprocess-data", "--input"])
        .arg(&input)
        .args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--append-eod"])
        .arg("--output-prefix")
        .arg(&prefix)
        .assert()
        .success();
    format!("{}_text_document", prefix.display())
}

/// `validation.full_validation` with `multiple_validation_sets`: each dataset of the
/// validation blend is evaluated whole and on its own, under its name. Every sample counts
/// once whatever the evaluation batch geometry, so the losses do not depend on it (3-sample
/// global batches pad the last one with samples that carry no loss).
#[test]
fn full_validation_evaluates_each_set_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (corpus(dir.path(), "wiki", 60, 1), corpus(dir.path(), "code", 40, 3));
    let blend = format!("+dataset.blend_per_split=[[\"{a}\"], [\"{a}\", \"{b}\"], [\"{b}\"]]");
    let losses = |extra: &[&str]| -> Vec<(String, f64)> {
        let out = mbridge()
            .args(["pretrain", "--recipe", "tiny_llama", &blend, "validation.skip_train=true"])
            .args(["validation.full_validation=true", "validation.eval_iters=1"])
            .args(extra)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .filter(|l| l.contains(" loss at iteration 0 on validation set"))
            .map(|l| {
                let name = l.split(" loss at").next().unwrap().trim().to_string();
                let v = l.split("lm loss value: ").nth(1).unwrap().split(' ').next().unwrap();
                (name, v.parse().unwrap())
            })
            .collect()
    };
    let named = [
        "validation.multiple_validation_sets=true",
        "validation.validation_set_names=[\"wiki\", \"code\"]",
    ];
    let whole = losses(&named);
    let names: Vec<&str> = whole.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["validation-wiki", "validation-code"]);
    let mut odd = named.to_vec();
    odd.extend(["validation.eval_micro_batch_size=1", "validation.eval_global_batch_size=3"]);
    for ((_, x), (_, y)) in whole.iter().zip(&losses(&odd)) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{whole:?} vs {odd:?}");
    }
    // The two sets differ, and unnamed sets are numbered.
    assert!((whole[0].1 - whole[1].1).abs() > 1e-3, "{whole:?}");
    let numbered = losses(&["validation.multiple_validation_sets=true"]);
    assert_eq!(numbered[0].0, "validation-0");
    assert_eq!(numbered[1].0, "validation-1");
    // One set over the combined blend lies between the two.
    let combined = losses(&[]);
    assert_eq!(combined.len(), 1);
    assert_eq!(combined[0].0, "validation");
    let (lo, hi) = (whole[0].1.min(whole[1].1), whole[0].1.max(whole[1].1));
    assert!(lo < combined[0].1 && combined[0].1 < hi, "{combined:?} not within {whole:?}");
}
