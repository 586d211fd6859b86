//! `mbridge finetune` on SFT data (unpacked and packed), from a pretrained checkpoint.

mod cli_common;

use assert_cmd::Command;
use cli_common::lm_losses;

const TOK: &str = "tests/fixtures/sft/tok";
const DATA: &str = "tests/fixtures/sft/data";

fn finetune(extra: &[String]) -> String {
    let (out, _) = finetune_with_log(extra);
    out
}

fn finetune_with_log(extra: &[String]) -> (String, String) {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args([
            "finetune",
            "--recipe",
            "tiny_llama",
            "tokenizer.tokenizer_type=HuggingFaceTokenizer",
        ])
        .arg(format!("+tokenizer.tokenizer_model={TOK}"))
        .arg(format!("+dataset.dataset_root={DATA}"))
        .args(["train.train_iters=30", "logger.log_interval=5", "validation.eval_interval=15"])
        .args(["validation.eval_iters=2", "optimizer.lr=3e-3"])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let log = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{text}\n{log}");
    (text, log)
}

#[test]
fn sft_unpacked_and_packed_learn_and_evaluate() {
    let out = finetune(&[]);
    assert!(out.contains("data: Finetuning"), "{out}");
    let l = lm_losses(&out);
    assert_eq!(l.len(), 6, "{out}");
    assert!(l[5] < l[0], "loss did not fall: {l:?}");
    assert!(out.contains("validation loss at iteration 15 on validation set"), "{out}");
    assert!(out.contains("on test set"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let packed = finetune(&[
        "+dataset.packed_sequence_specs.packed_sequence_size=64".into(),
        format!(
            "+dataset.packed_sequence_specs.packed_train_data_path={}",
            dir.path().join("train.idx.jsonl").display()
        ),
    ]);
    let l = lm_losses(&packed);
    assert_eq!(l.len(), 6, "{packed}");
    assert!(dir.path().join("train.idx.jsonl").is_file(), "packed bins were not written");
    assert!(l[5] < l[0], "packed loss did not fall: {l:?}");
}

/// Packed batches reach attention as THD boundaries (`cu_seqlens`). `pad_cu_seqlens` only
/// appends zero-length padding sequences to them, so training must give exactly the same
/// (finite) losses with and without it; so must validation.
#[test]
fn packed_pad_cu_seqlens_changes_nothing() {
    let run = |pad: bool| {
        let dir = tempfile::tempdir().unwrap();
        finetune(&[
            "+dataset.packed_sequence_specs.packed_sequence_size=64".into(),
            format!(
                "+dataset.packed_sequence_specs.packed_train_data_path={}",
                dir.path().join("train.idx.jsonl").display()
            ),
            format!("+dataset.packed_sequence_specs.pad_cu_seqlens={pad}"),
        ])
    };
    let (plain, padded) = (run(false), run(true));
    let (lp, lq) = (lm_losses(&plain), lm_losses(&padded));
    assert_eq!(lp.len(), 6, "{plain}");
    assert!(lp.iter().all(|l| l.is_finite()), "{plain}");
    assert_eq!(lp, lq, "pad_cu_seqlens changed the losses:\n{plain}\n{padded}");
    let valid = |out: &str| -> Vec<String> {
        out.lines().filter(|l| l.contains("validation loss")).map(str::to_string).collect()
    };
    assert!(!valid(&plain).is_empty(), "{plain}");
    assert_eq!(valid(&plain), valid(&padded));
}

#[test]
fn finetune_starts_from_a_pretrained_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    // Pretrain with the same tokenizer so the vocabularies agree.
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "tokenizer.tokenizer_type=HuggingFaceTokenizer",
        ])
        .arg(format!("+tokenizer.tokenizer_model={TOK}"))
        .args(["train.train_iters=3", "validation.eval_iters=0"])
        .arg(format!("+checkpoint.save={}", base.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (text, log) =
        finetune_with_log(&[format!("+checkpoint.pretrained_checkpoint={}", base.display())]);
    assert!(text.contains(" iteration        5/"), "{text}");
    assert!(log.contains("initialized weights from pretrained checkpoint"), "{log}");
}

/// SFT batches are padded to a multiple of 2·CP and split over the context-parallel ranks;
/// with Megatron Bridge's per-token loss (which it requires for CP finetuning) the loss curve
/// is one rank's.
#[test]
fn sft_with_context_parallelism_matches_one_rank() {
    let per_token = ["model.calculate_per_token_loss=true".to_string()];
    let one = lm_losses(&finetune(&per_token));
    let cp = [
        "--nproc-per-node".to_string(),
        "2".into(),
        "model.context_parallel_size=2".into(),
        per_token[0].clone(),
    ];
    let two = lm_losses(&finetune(&cp));
    assert!(!one.is_empty());
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() / a <= 1e-5, "CP=2 {b} vs one rank {a}");
    }
    // Without per-token loss Megatron Bridge refuses CP finetuning, and so does mbridge.
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["finetune", "--recipe", "tiny_llama", "model.context_parallel_size=2"])
        .arg(format!("+dataset.dataset_root={DATA}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model.calculate_per_token_loss=true"), "{err}");
}

/// `train.num_epochs` (Megatron Bridge's `_resolve_num_epochs`): the SFT training split (41
/// examples) at global batch 4 is 11 iterations per epoch, so 2 epochs run 22 iterations and
/// 0.5 epochs 6; pretraining data, whose size is what it is asked for, is refused.
#[test]
fn num_epochs_sets_the_iterations_from_the_training_split() {
    let run = |epochs: &str| {
        let out = Command::cargo_bin("mbridge")
            .unwrap()
            .args(["finetune", "--recipe", "tiny_llama"])
            .arg("tokenizer.tokenizer_type=HuggingFaceTokenizer")
            .arg(format!("+tokenizer.tokenizer_model={TOK}"))
            .arg(format!("+dataset.dataset_root={DATA}"))
            .args(["~train.train_iters", &format!("+train.num_epochs={epochs}")])
            .args(["logger.log_interval=1", "validation.eval_iters=0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let two = run("2");
    assert!(
        two.contains(
            "Setting training iterations to 22 based on 2 epochs, 41 train samples, 11 \
             iterations per epoch, and global batch size 4"
        ),
        "{two}"
    );
    assert_eq!(lm_losses(&two).len(), 22, "{two}");
    assert!(run("0.5").contains("Setting training iterations to 6 based on 0.5 epochs"));
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "~train.train_iters", "+train.num_epochs=1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("only supported for finite SFT datasets"),
        "{err}"
    );
}
