//! SFT data against the reference script (`scripts/fixtures/sft_reference.py`): prompt/completion
//! and chat tokenization with a real HF tokenizer, packing bins and metadata from Megatron
//! Bridge's own packing code, and the build → reuse cycle of packed files.
use std::path::{Path, PathBuf};

use mbridge::config::dataset::{DatasetConfig, PackedSequenceSpecs};
use mbridge::data::numpy_rng::RandomState;
use mbridge::data::sft::chat::tokenize_chat;
use mbridge::data::sft::prompt::{
    is_space_sensitive, tokenize_prompt_completion, PcLossMode, PcTokenInfo,
    PromptCompletionConfig, Truncation,
};
use mbridge::data::sft::{
    build_sft_datasets, pack_examples, ChatLossMode, ChatTemplate, PackParams, PackedBin,
    PackingAlgorithm, PackingMetadata, SftBatch, SftBuildOptions, SftExample, SftSplit,
};
use mbridge::data::tokenizer::{HfTokenizer, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sft")
}
fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}
fn tok() -> HfTokenizer {
    HfTokenizer::from_path(fixtures().join("tok")).unwrap()
}
fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}
fn mask(v: &Value) -> Vec<u8> {
    ids(v).into_iter().map(|x| x as u8).collect()
}

#[test]
fn numpy_shuffle_vector() {
    let mut rng = RandomState::new(1234);
    let mut v = vec![2, 3, 5];
    rng.shuffle(&mut v);
    assert_eq!(v, ids(&expected()["shuffle_1234_235"]));
}

#[test]
fn prompt_completion_matches_reference() {
    let e = expected();
    let tok = tok();
    assert_eq!(tok.eod(), e["eos"].as_i64().unwrap());
    assert_eq!(is_space_sensitive(&tok), e["space_sensitive"].as_bool().unwrap());
    let info = PcTokenInfo::new(&tok).unwrap();
    assert_eq!(info.skipped, vec![e["pad"].as_i64().unwrap()]);
    let base = PromptCompletionConfig::resolve(&Default::default()).unwrap();
    let cases = e["prompt_completion"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for (i, c) in cases.iter().enumerate() {
        let kw = &c["kwargs"];
        let cfg = PromptCompletionConfig {
            separator: kw["separator"].as_str().unwrap_or(" ").into(),
            truncation: if kw["truncation"] == "left" {
                Truncation::Left
            } else {
                Truncation::Right
            },
            loss_mode: if kw["loss_mode"] == "full" {
                PcLossMode::Full
            } else {
                PcLossMode::Completion
            },
            prompt_template: kw["template"].as_str().unwrap_or("{prompt}").into(),
            ..base.clone()
        };
        let max = kw["max_length"].as_u64().unwrap() as usize;
        let got = tokenize_prompt_completion(
            c["input"].as_str().unwrap(),
            c["output"].as_str().unwrap(),
            &cfg,
            &info,
            &tok,
            max,
        )
        .unwrap();
        assert_eq!(got.input_ids, ids(&c["input_ids"]), "case {i}: {kw}");
        assert_eq!(got.loss_mask, mask(&c["loss_mask"]), "case {i}: {kw}");
        assert_eq!(
            got.answer_start_idx as u64,
            c["answer_start_idx"].as_u64().unwrap(),
            "case {i}"
        );
    }
}

/// messages, tools, chat_template_kwargs of one chat row.
type ChatRow = (Vec<Value>, Option<Value>, serde_json::Map<String, Value>);

fn chat_rows() -> Vec<ChatRow> {
    let cols =
        mbridge::data::sft::rows::Columns { prompt: "input".into(), completion: "output".into() };
    mbridge::data::sft::rows::read_rows(&fixtures().join("chat/training.jsonl"), &cols)
        .unwrap()
        .into_iter()
        .map(|(_, r)| match r {
            mbridge::data::sft::rows::SftRow::Chat { messages, tools, kwargs } => {
                (messages, tools, kwargs)
            }
            other => panic!("not a chat row: {other:?}"),
        })
        .collect()
}

#[test]
fn chat_matches_transformers() {
    let e = expected();
    let tok = tok();
    let tmpl = ChatTemplate::new(tok.chat_template().unwrap(), &tok).unwrap();
    assert!(tmpl.has_generation());
    let plain = ChatTemplate::new(e["chat_template_plain"].as_str().unwrap(), &tok).unwrap();
    assert!(!plain.has_generation());
    for (i, ((msgs, tools, kw), c)) in
        chat_rows().iter().zip(e["chat"].as_array().unwrap()).enumerate()
    {
        let r = tmpl.render(msgs, tools.as_ref(), kw, false).unwrap();
        assert_eq!(r.text, c["text"].as_str().unwrap(), "row {i}");
        for (mode, key) in
            [(ChatLossMode::Assistant, "assistant"), (ChatLossMode::LastTurn, "last_turn")]
        {
            let got = tokenize_chat(msgs, tools.as_ref(), kw, &tmpl, &tok, mode, 4096).unwrap();
            assert_eq!(got.input_ids, ids(&c["input_ids"]), "row {i}");
            assert_eq!(got.loss_mask, mask(&c[key]), "row {i} {key}");
        }
        let full =
            tokenize_chat(msgs, tools.as_ref(), kw, &tmpl, &tok, ChatLossMode::Full, 4096).unwrap();
        assert!(full.loss_mask.iter().all(|&m| m == 1));
        // Without {% generation %}: prefix-diff assistant spans.
        let got =
            tokenize_chat(msgs, tools.as_ref(), kw, &plain, &tok, ChatLossMode::Assistant, 4096)
                .unwrap();
        assert_eq!(got.input_ids, ids(&c["plain_ids"]), "row {i}");
        assert_eq!(got.loss_mask, mask(&c["plain"]), "row {i} plain");
    }
}

#[test]
fn chat_truncation_and_generation_prompt() {
    let tok = tok();
    let tmpl = ChatTemplate::new(tok.chat_template().unwrap(), &tok).unwrap();
    let (msgs, tools, kw) = chat_rows().remove(0);
    let r = tmpl.render(&msgs[..2], tools.as_ref(), &kw, true).unwrap();
    assert!(r.text.ends_with("<|im_start|>assistant\n"), "{:?}", r.text);
    assert!(r.spans.is_empty());
    // Truncated before the answer: falls back to training on everything (reference behaviour).
    let ex = tokenize_chat(&msgs, tools.as_ref(), &kw, &tmpl, &tok, ChatLossMode::Assistant, 10)
        .unwrap();
    assert_eq!(ex.input_ids.len(), 11);
    assert!(ex.loss_mask.iter().all(|&m| m == 1));
}

fn corpus_examples(split: &str, max_len: usize) -> Vec<SftExample> {
    let tok = tok();
    let cfg = DatasetConfig::default();
    let tz = mbridge::data::sft::SftTokenization::new(&cfg, &tok, None).unwrap();
    tz.tokenize_file(&fixtures().join(format!("data/{split}.jsonl")), max_len).unwrap()
}

fn algo(s: &str) -> PackingAlgorithm {
    match s {
        "first_fit_shuffle" => PackingAlgorithm::FirstFitShuffle,
        "first_fit_decreasing" => PackingAlgorithm::FirstFitDecreasing,
        o => panic!("{o}"),
    }
}

#[test]
fn packing_matches_megatron_bridge() {
    let e = expected();
    assert!(e["packing_source"].as_str().unwrap().contains("megatron-bridge"));
    for c in e["packing"].as_array().unwrap() {
        let max_len = c["max_len"].as_u64().unwrap() as usize;
        let examples = corpus_examples(c["split"].as_str().unwrap(), max_len);
        let p = PackParams {
            pack_size: c["pack_size"].as_u64().unwrap() as usize,
            max_seq_len: max_len,
            pad_seq_to_mult: c["pad_seq_to_mult"].as_u64().unwrap() as usize,
            pad_id: tok().eod(),
            seed: c["seed"].as_u64().unwrap() as u32,
            algorithm: algo(c["algorithm"].as_str().unwrap()),
        };
        let (bins, meta) = pack_examples(&examples, &p).unwrap();
        let want_bins: Vec<PackedBin> = serde_json::from_value(c["bins"].clone()).unwrap();
        let want_meta: PackingMetadata = serde_json::from_value(c["metadata"].clone()).unwrap();
        assert_eq!(meta, want_meta, "{p:?}");
        assert_eq!(bins.len(), want_bins.len(), "{p:?}");
        for (i, (g, w)) in bins.iter().zip(&want_bins).enumerate() {
            assert_eq!(g, w, "bin {i} of {p:?}");
        }
    }
}

#[test]
fn build_packs_once_and_reuses() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["training.jsonl", "validation.jsonl", "test.jsonl"] {
        std::fs::copy(fixtures().join("data").join(f), dir.path().join(f)).unwrap();
    }
    let cfg = DatasetConfig {
        dataset_root: Some(dir.path().display().to_string()),
        packed_sequence_specs: Some(PackedSequenceSpecs {
            packed_sequence_size: 64,
            ..Default::default()
        }),
        ..Default::default()
    };
    let tok = tok();
    let opts = SftBuildOptions::new(64, "tiny/chatml-bpe");
    let ds = build_sft_datasets(&cfg, &tok, &opts).unwrap();
    let packed_dir = ds.packed_dir.clone().unwrap();
    let name = packed_dir.file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("tiny--chatml-bpe_pad_seq_to_mult1_sft_"), "{name}");
    for f in ["training_64.idx.jsonl", "validation_64.idx.jsonl", "64_metadata.jsonl"] {
        assert!(packed_dir.join(f).is_file(), "{f}");
    }
    // Same bins as the reference for (P=64, max 64, k=1, first_fit_shuffle).
    let e = expected();
    let want: Vec<PackedBin> = serde_json::from_value(e["packing"][0]["bins"].clone()).unwrap();
    let SftSplit::Packed(train) = &ds.train else { panic!("train is not packed") };
    assert_eq!(train.bins, want);
    let meta: Vec<PackingMetadata> = serde_json::from_str(
        &std::fs::read_to_string(packed_dir.join("64_metadata.jsonl")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta.len(), 2);
    assert!(matches!(ds.test, Some(SftSplit::Unpacked(_))));
    // Packed batch: THD boundaries over the bin's rows, positions restart per row.
    let b = ds.train.collate(&[Some(0)]).unwrap();
    let SftBatch::Packed(pb) = &b else { panic!() };
    let bin = &train.bins[0];
    let n_rows = bin.seq_start_id.len();
    assert_eq!(
        pb.cu_seqlens[0].len(),
        n_rows
            + 1
            + usize::from(
                *pb.cu_seqlens[0].last().unwrap() as usize != bin.input_ids.len() - n_rows
            )
    );
    let m = b.attention_mask(&candle_core::Device::Cpu).unwrap().unwrap();
    assert_eq!(m.dims(), &[1, 1, pb.batch.seq_length, pb.batch.seq_length]);
    // Reuse: a second build reads the same directory (its files untouched).
    let stamp =
        std::fs::metadata(packed_dir.join("training_64.idx.jsonl")).unwrap().modified().unwrap();
    let again = build_sft_datasets(&cfg, &tok, &opts).unwrap();
    assert_eq!(again.packed_dir.as_ref(), Some(&packed_dir));
    let stamp2 =
        std::fs::metadata(packed_dir.join("training_64.idx.jsonl")).unwrap().modified().unwrap();
    assert_eq!(stamp, stamp2);
    // Changed data ⇒ new fingerprint ⇒ repacked elsewhere.
    let mut text = std::fs::read_to_string(dir.path().join("training.jsonl")).unwrap();
    text.push_str("{\"input\": \"one more\", \"output\": \"row\"}\n");
    std::fs::write(dir.path().join("training.jsonl"), text).unwrap();
    let third = build_sft_datasets(&cfg, &tok, &opts).unwrap();
    assert_ne!(third.packed_dir.as_ref(), Some(&packed_dir));
}

#[test]
fn packed_and_unpacked_batches_carry_the_same_tokens() {
    // Every row of a packed bin appears, shifted, exactly as its unpacked collate would.
    let examples = corpus_examples("validation", 64);
    let p = PackParams {
        pack_size: 64,
        max_seq_len: 64,
        pad_seq_to_mult: 1,
        pad_id: 0,
        seed: 1234,
        algorithm: PackingAlgorithm::FirstFitShuffle,
    };
    let (bins, _) = pack_examples(&examples, &p).unwrap();
    let mut seen = 0;
    for bin in &bins {
        let mut b = bin.seq_start_id.clone();
        b.push(bin.input_ids.len());
        for w in b.windows(2) {
            let row = &bin.input_ids[w[0]..w[1]];
            let ex =
                examples.iter().find(|e| e.input_ids == row).expect("row comes from the split");
            assert_eq!(&bin.loss_mask[w[0]..w[1] - 1], &ex.loss_mask[1..]);
            seen += 1;
        }
    }
    assert_eq!(seen, examples.len());
}

#[test]
fn template_features_match_transformers() {
    // tools | tojson (compact and indented), namespace, loop controls, str methods, filters.
    let e = expected();
    let c = &e["tools_case"];
    let tok = tok();
    let tmpl = ChatTemplate::new(c["template"].as_str().unwrap(), &tok).unwrap();
    let msgs: Vec<Value> = c["messages"].as_array().unwrap().clone();
    let r = tmpl.render(&msgs, Some(&c["tools"]), &Default::default(), true).unwrap();
    assert_eq!(r.text, c["text"].as_str().unwrap());
    // raise_exception surfaces as an error naming the message.
    let bad = vec![serde_json::json!({"role": "robot", "content": "x"})];
    let err = tmpl.render(&bad, None, &Default::default(), false).unwrap_err().to_string();
    assert!(err.contains("bad role robot"), "{err}");
}

#[test]
fn legacy_template_matches_gpt_sft_dataset() {
    use mbridge::data::sft::legacy::LegacyTemplate;
    let e = expected();
    let tok = tok();
    let info = PcTokenInfo::new(&tok).unwrap();
    let cases = e["legacy"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for (i, c) in cases.iter().enumerate() {
        let kw: toml::Table = serde_json::from_value(c["kwargs"].clone()).unwrap();
        let t = LegacyTemplate::from_kwargs(Some(&kw)).unwrap().unwrap();
        let row = c["row"].as_object().unwrap();
        let got = t.process(row, &tok, &info, c["max_len"].as_u64().unwrap() as usize).unwrap();
        assert_eq!(got.input_ids, ids(&c["input_ids"]), "case {i}: {}", c["kwargs"]);
        assert_eq!(
            got.answer_start_idx as u64,
            c["answer_start_idx"].as_u64().unwrap(),
            "case {i}"
        );
        assert_eq!(got.loss_mask, mask(&c["loss_mask"]), "case {i}");
    }
}

#[test]
fn legacy_template_through_the_builder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("data/training.jsonl"), dir.path().join("training.jsonl"))
        .unwrap();
    let kw: toml::Table =
        toml::from_str("prompt_template = 'Q: {input}\\n\\nA: {output}'\npad_to_max_length = true")
            .unwrap();
    let cfg = DatasetConfig {
        dataset_root: Some(dir.path().display().to_string()),
        do_validation: false,
        do_test: false,
        dataset_kwargs: Some(kw),
        ..Default::default()
    };
    let ds = build_sft_datasets(&cfg, &tok(), &SftBuildOptions::new(64, "t")).unwrap();
    let e = expected();
    let b = ds.train.collate(&[Some(0)]).unwrap();
    assert_eq!(b.batch().seq_length, 64, "dataset_kwargs.pad_to_max_length");
    let want = ids(&e["legacy"][0]["input_ids"]);
    assert_eq!(&b.batch().tokens[..want.len() - 1], &want[..want.len() - 1]);
}
