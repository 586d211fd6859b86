//! SFT data: bad input and the edges of building (missing files, bad rows, mixed schemas,
//! disabled splits, over-long rows in packing, packed collate with padding rules).
use std::path::Path;

use mbridge::config::dataset::{DatasetConfig, PackedSequenceSpecs, SftPreprocessingConfig};
use mbridge::data::sft::{
    build_sft_datasets, collate_packed, pack_examples, CollateParams, PackParams, PackedBin,
    PackedParams, PackingAlgorithm, PackingMetadata, SftBatch, SftBuildOptions, SftExample,
    SftSplit,
};
use mbridge::data::tokenizer::{HfTokenizer, NullTokenizer};

fn tok() -> HfTokenizer {
    HfTokenizer::from_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sft/tok"))
        .unwrap()
}

fn root(files: &[(&str, &str)]) -> (tempfile::TempDir, DatasetConfig) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let cfg = DatasetConfig {
        dataset_root: Some(dir.path().display().to_string()),
        ..Default::default()
    };
    (dir, cfg)
}

fn err(cfg: &DatasetConfig) -> String {
    format!("{:#}", build_sft_datasets(cfg, &tok(), &SftBuildOptions::new(64, "t")).unwrap_err())
}

const ROW: &str = "{\"input\": \"what is the capital\", \"output\": \"paris\"}\n";

#[test]
fn missing_files() {
    let (_d, cfg) = root(&[]);
    assert!(err(&cfg).contains("training.jsonl not found"), "{}", err(&cfg));
    let (_d, cfg) = root(&[("training.jsonl", ROW)]);
    let e = err(&cfg);
    assert!(e.contains("validation.jsonl not found") && e.contains("do_validation=false"), "{e}");
    let cfg = DatasetConfig { do_validation: false, do_test: false, ..cfg };
    let ds = build_sft_datasets(&cfg, &tok(), &SftBuildOptions::new(64, "t")).unwrap();
    assert!(ds.valid.is_none() && ds.test.is_none());
    assert_eq!(ds.train.len(), 1);
    let cfg = DatasetConfig { dataset_root: Some("/nonexistent/sft".into()), ..Default::default() };
    assert!(err(&cfg).contains("not a directory"));
}

#[test]
fn bad_rows_name_file_and_line() {
    let only_train = |text: &str| {
        let (d, cfg) = root(&[("training.jsonl", text)]);
        (d, DatasetConfig { do_validation: false, do_test: false, ..cfg })
    };
    let (_d, cfg) = only_train(&format!("{ROW}{{\"input\": \"x\", \"output\": }}\n"));
    let e = err(&cfg);
    assert!(e.contains("training.jsonl:2") && e.contains("not valid JSON"), "{e}");
    let (_d, cfg) = only_train(&format!("{ROW}\n{ROW}{{\"question\": \"x\"}}\n"));
    let e = err(&cfg);
    assert!(e.contains("training.jsonl:4") && e.contains("found keys"), "{e}");
    let (_d, cfg) = only_train("{\"input\": \"a\", \"output\": \"b\", \"messages\": [{\"role\": \"user\", \"content\": \"c\"}]}\n");
    let e = err(&cfg);
    assert!(e.contains("training.jsonl:1") && e.contains("exactly one"), "{e}");
    let (_d, cfg) = only_train("[1, 2]\n");
    assert!(err(&cfg).contains("expected a JSON object"));
    let (_d, cfg) = only_train("");
    assert!(err(&cfg).contains("has no rows"));
    // Chat rows need a chat template.
    let (_d, cfg) = only_train("{\"messages\": [{\"role\": \"user\", \"content\": \"1 2\"}]}\n");
    let e = format!(
        "{:#}",
        build_sft_datasets(&cfg, &NullTokenizer::new(10), &SftBuildOptions::new(64, "t"))
            .unwrap_err()
    );
    assert!(e.contains("training.jsonl:1") && e.contains("chat_template"), "{e}");
    // Bad settings.
    let (_d, mut cfg) = only_train(ROW);
    cfg.preprocessing =
        SftPreprocessingConfig { loss_mode: Some("answers".into()), ..Default::default() };
    assert!(err(&cfg).contains("loss_mode"));
    cfg.preprocessing =
        SftPreprocessingConfig { prompt_template: Some("{input}".into()), ..Default::default() };
    assert!(err(&cfg).contains("{prompt}"));
}

#[test]
fn configured_columns_and_unpacked_collate() {
    let (_d, cfg) = root(&[(
        "training.jsonl",
        "{\"q\": \"what is\", \"a\": \"paris\"}\n{\"prompt\": \"the\", \"completion\": \"dog\"}\n",
    )]);
    let cfg = DatasetConfig {
        do_validation: false,
        do_test: false,
        max_train_samples: Some(5),
        preprocessing: SftPreprocessingConfig {
            prompt_column: Some("q".into()),
            completion_column: Some("a".into()),
            ..Default::default()
        },
        ..cfg
    };
    let ds = build_sft_datasets(&cfg, &tok(), &SftBuildOptions::new(64, "t")).unwrap();
    assert_eq!(ds.train.len(), 5);
    let SftSplit::Unpacked(d) = &ds.train else { panic!() };
    let m = d.mapping.clone().unwrap();
    let mut epoch = m[..2].to_vec();
    epoch.sort();
    assert_eq!(epoch, vec![0, 1], "each epoch is a permutation: {m:?}");
    assert_eq!(m[2..4].iter().sum::<usize>(), 1, "{m:?}");
    let b = ds.train.collate(&[Some(0), None]).unwrap();
    let SftBatch::Unpacked(b) = b else { panic!() };
    assert_eq!(b.seq_length, 16);
    assert_eq!(b.tokens.len(), 32);
    assert!(b.loss_mask[16..].iter().all(|&x| x == 0.0), "padding sample carries no loss");
    assert!(ds.train.collate(&[Some(5)]).is_err());
}

fn ex(len: usize, answer: usize) -> SftExample {
    SftExample {
        input_ids: (0..len as i64).map(|i| 10 + i).collect(),
        loss_mask: (0..len).map(|i| u8::from(i >= answer)).collect(),
        answer_start_idx: answer,
    }
}

#[test]
fn packing_skips_overlong_rows_and_prepads() {
    let rows = vec![ex(4, 1), ex(3, 1), ex(6, 2), ex(20, 3)];
    let p = PackParams {
        pack_size: 8,
        max_seq_len: 8,
        pad_seq_to_mult: 1,
        pad_id: 2,
        seed: 1234,
        algorithm: PackingAlgorithm::FirstFitShuffle,
    };
    let (bins, meta) = pack_examples(&rows, &p).unwrap();
    let n: usize = bins.iter().map(|b| b.seq_start_id.len()).sum();
    assert_eq!(n, 3, "the 20-token row is skipped");
    assert_eq!(meta.dataset_max_seqlen, 5);
    // Spec vector: lengths [2,3,5] with seed 1234 ⇒ bins [[2,3],[5]].
    let lens: Vec<Vec<usize>> = bins
        .iter()
        .map(|b| {
            let mut e = b.seq_start_id.clone();
            e.push(b.input_ids.len());
            e.windows(2).map(|w| w[1] - w[0] - 1).collect()
        })
        .collect();
    assert_eq!(lens, vec![vec![2, 3], vec![5]]);
    // Masks shifted left by one: [0,1,1] → [1,1,0], [0,1,1,1] → [1,1,1,0].
    assert_eq!(bins[0].loss_mask, vec![1, 1, 0, 1, 1, 1, 0]);
    // pad_seq_to_mult 4: seq_lens round up to 4 and 8 (pad id 2, mask 0).
    let p4 = PackParams { pad_seq_to_mult: 4, pack_size: 16, max_seq_len: 16, ..p };
    let (bins, _) = pack_examples(&rows[..3], &p4).unwrap();
    let total: usize = bins.iter().map(|b| b.input_ids.len()).sum();
    assert_eq!(total, 5 + 5 + 9);
    // Every row too long ⇒ a clear error.
    let p2 = PackParams { max_seq_len: 1, ..p };
    assert!(pack_examples(&rows, &p2).unwrap_err().to_string().contains("nothing to pack"));
    let bad = PackParams { max_seq_len: 9, ..p };
    assert!(pack_examples(&rows, &bad).is_err());
}

#[test]
fn packed_collate_padding_rules() {
    // Two rows padded to multiples of 4: A = 3 real tokens + 2 pads (eos 2), B = 5 tokens.
    let bin = PackedBin {
        input_ids: vec![10, 11, 2, 2, 2, 20, 21, 22, 23, 2],
        loss_mask: vec![0, 1, 0, 0, 0, 1, 1, 1, 1, 0],
        seq_start_id: vec![0, 5],
    };
    let collate = CollateParams {
        max_seq_length: 16,
        pad_to_max_length: true,
        pad_seq_length_to_mult: 1,
        eos_id: 2,
    };
    let meta = PackingMetadata {
        dataset_max_seqlen: 4,
        max_samples_per_bin: 3,
        packing_factor: 2.0,
        packing_efficiency: 50.0,
        pack_size: 16,
        min_packed_seqlen: 8,
    };
    let p = PackedParams { collate, pad_seq_to_mult: 4, pad_cu_seqlens: false };
    let b = collate_packed(&[(&bin, true)], std::slice::from_ref(&meta), &p).unwrap();
    assert_eq!(b.cu_seqlens_padded, Some(vec![vec![0, 4, 8, 16]]));
    assert_eq!(b.cu_seqlens, vec![vec![0, 2, 6, 6]]);
    // EOS inputs carry no loss.
    assert_eq!(&b.batch.loss_mask[..8], &[0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    let p = PackedParams { pad_cu_seqlens: true, ..p };
    let b = collate_packed(&[(&bin, true)], &[meta], &p).unwrap();
    assert_eq!(b.cu_seqlens[0].len(), 5);
    assert_eq!(b.max_seqlen, vec![8]);
    assert!(collate_packed(
        &[(&PackedBin { seq_start_id: vec![1], ..bin.clone() }, true)],
        &[],
        &p
    )
    .is_err());
}

#[test]
fn packing_config_errors() {
    let (_d, cfg) = root(&[("training.jsonl", ROW)]);
    let mut cfg = DatasetConfig { do_validation: false, do_test: false, ..cfg };
    cfg.packed_sequence_specs = Some(PackedSequenceSpecs {
        packed_sequence_size: 32,
        max_single_sequence_length: Some(64),
        ..Default::default()
    });
    assert!(err(&cfg).contains("max_single_sequence_length"));
    cfg.packed_sequence_specs = Some(PackedSequenceSpecs {
        packed_sequence_size: 32,
        packed_train_data_path: Some("x.parquet".into()),
        ..Default::default()
    });
    assert!(err(&cfg).contains("JSONL"));
}

#[test]
fn preprocessing_settings_load_through_the_config() {
    use mbridge::config::recipes::Task;
    use mbridge::config::{finalize, load, ConfigRequest};
    let req = |ov: &[&str]| ConfigRequest {
        recipe: Some("tiny_llama".into()),
        task: Some(Task::Pretrain),
        overrides: ov.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let loaded = load(&req(&[
        "+dataset.dataset_root=\"/data/sft\"",
        "+dataset.preprocessing.loss_mode=\"full\"",
        "+dataset.preprocessing.separator=\" \"",
        "+tokenizer.chat_template=\"{{ messages }}\"",
    ]))
    .unwrap();
    let f = finalize(loaded.cfg, None, None).unwrap();
    assert_eq!(f.cfg.dataset.preprocessing.loss_mode.as_deref(), Some("full"));
    assert_eq!(f.cfg.dataset.preprocessing.separator.as_deref(), Some(" "));
    let opts = SftBuildOptions::from_config(&f.cfg).unwrap();
    assert_eq!(opts.seq_length, f.cfg.model.seq_length);
    assert_eq!(opts.chat_template.as_deref(), Some("{{ messages }}"));
    assert!(!opts.pad_to_max_length);
    let e = load(&req(&["+dataset.preprocessing.los_mode=\"full\""])).unwrap_err().to_string();
    assert!(e.contains("did you mean `dataset.preprocessing.loss_mode`"), "{e}");
}

#[test]
fn explicit_packed_paths_are_written_then_reused() {
    let (d, cfg) = root(&[("training.jsonl", &ROW.repeat(5))]);
    let train = d.path().join("mine/train.jsonl");
    let meta = d.path().join("mine/meta.jsonl");
    let cfg = DatasetConfig {
        do_validation: false,
        do_test: false,
        packed_sequence_specs: Some(PackedSequenceSpecs {
            packed_sequence_size: 32,
            packed_train_data_path: Some(train.display().to_string()),
            packed_metadata_path: Some(meta.display().to_string()),
            ..Default::default()
        }),
        ..cfg
    };
    let ds = build_sft_datasets(&cfg, &tok(), &SftBuildOptions::new(32, "t")).unwrap();
    assert!(train.is_file() && meta.is_file());
    let SftSplit::Packed(p) = &ds.train else { panic!("not packed") };
    assert_eq!(p.path, train);
    let rows: usize = p.bins.iter().map(|b| b.seq_start_id.len()).sum();
    assert_eq!(rows, 5);
    // A corrupt explicit file is reported with its line, not silently repacked.
    std::fs::write(&train, "{\"input_ids\": [1]}\n").unwrap();
    let e = err(&DatasetConfig { ..cfg });
    assert!(e.contains("train.jsonl:1"), "{e}");
}
