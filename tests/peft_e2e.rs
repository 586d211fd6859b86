//! `mbridge finetune --peft lora|dora` through the binary: loss falls, checkpoints hold the
//! adapters only, a resume loads the base from `pretrained_checkpoint` and the adapters from
//! `load`.

mod cli_common;

use assert_cmd::Command;
use cli_common::lm_losses;
use std::path::Path;

const TOK: &str = "tests/fixtures/sft/tok";
const DATA: &str = "tests/fixtures/sft/data";

fn mbridge(args: &[String]) -> (String, String) {
    let out = Command::cargo_bin("mbridge").unwrap().args(args).output().unwrap();
    let (text, log) =
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "{args:?}\n{text}\n{log}");
    (text, log)
}

fn common() -> Vec<String> {
    vec![
        "--recipe".into(),
        "tiny_llama".into(),
        "tokenizer.tokenizer_type=HuggingFaceTokenizer".into(),
        format!("+tokenizer.tokenizer_model={TOK}"),
    ]
}

fn pretrain(base: &Path) {
    let mut a = vec!["pretrain".to_string()];
    a.extend(common());
    a.extend(["train.train_iters=3".into(), "validation.eval_iters=0".into()]);
    a.push(format!("+checkpoint.save={}", base.display()));
    mbridge(&a);
}

fn finetune(scheme: &str, base: &Path, save: &Path, iters: u32, extra: &[String]) -> String {
    let mut a = vec!["finetune".to_string(), "--peft".into(), scheme.into()];
    a.extend(common());
    a.push(format!("+dataset.dataset_root={DATA}"));
    a.push(format!("checkpoint.pretrained_checkpoint={}", base.display()));
    a.push(format!("+checkpoint.save={}", save.display()));
    a.push(format!("train.train_iters={iters}"));
    a.extend(["logger.log_interval=5".into(), "validation.eval_iters=0".into()]);
    a.extend(["optimizer.lr=1e-2".into(), "checkpoint.save_interval=10".into()]);
    a.extend(extra.iter().cloned());
    mbridge(&a).0
}

fn model_tensor_names(iter_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = mbridge::ckpt::load_tensors(iter_dir, "model")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    names.sort();
    names
}

#[test]
fn lora_trains_saves_adapters_only_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, run) = (dir.path().join("base"), dir.path().join("lora"));
    pretrain(&base);
    let out = finetune("lora", &base, &run, 20, &[]);
    let l = lm_losses(&out);
    assert_eq!(l.len(), 4, "{out}");
    assert!(l[3] < l[0], "LoRA loss did not fall: {l:?}");
    let names = model_tensor_names(&run.join("iter_0000020"));
    assert!(!names.is_empty());
    assert!(
        names
            .iter()
            .all(|n| n.contains(".adapter.linear_in.") || n.contains(".adapter.linear_out.")),
        "checkpoint holds more than adapters: {names:?}"
    );
    // Resume to 30: base from pretrained_checkpoint, adapters + optimizer from load.
    let resumed =
        finetune("lora", &base, &run, 30, &[format!("+checkpoint.load={}", run.display())]);
    assert!(resumed.contains(" iteration       25/"), "{resumed}");
    assert!(!resumed.contains(" iteration        5/"), "did not resume: {resumed}");
    let r = lm_losses(&resumed);
    assert!(r[0] < l[0], "resumed loss {r:?} should continue from {l:?}");
}

#[test]
fn dora_trains_and_saves_magnitudes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, run) = (dir.path().join("base"), dir.path().join("dora"));
    pretrain(&base);
    let out = finetune("dora", &base, &run, 10, &[]);
    let l = lm_losses(&out);
    assert!(l[1] < l[0], "DoRA loss did not fall: {l:?}");
    let names = model_tensor_names(&run.join("iter_0000010"));
    assert!(names.iter().any(|n| n.ends_with(".adapter.weight_magnitude")), "{names:?}");
}
