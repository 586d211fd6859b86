//! Parity with megatron-core 0.16.1 and NumPy: fixtures from scripts/fixtures/data_megatron.py.
use std::path::{Path, PathBuf};

use mbridge::data::gpt_dataset::ltor_attention_mask;
use mbridge::data::indexed::{bin_path, idx_path};
use mbridge::data::numpy_rng::{Pcg64Generator, RandomState};
use mbridge::data::{
    build_gpt_datasets, Blend, BlendSpec, DType, GptDatasetParams, IndexedDataset,
};
use mbridge::data::{IndexedDatasetBuilder, PretrainDataset};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn load(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn legacy_random_state_matches_numpy() {
    let f = load("numpy_rng.json");
    for case in f["legacy"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap() as u32;
        let mut r = RandomState::new(seed);
        let key: Vec<i64> = r.key()[..4].iter().map(|&k| k as i64).collect();
        assert_eq!(key, ints(&case["key4"]), "seed {seed}");
        let raw: Vec<i64> = (0..1300).map(|_| r.next_u32() as i64).collect();
        assert_eq!(raw[..8].to_vec(), ints(&case["raw_first"]));
        assert_eq!(raw[620..640].to_vec(), ints(&case["raw_tail"]));
        assert_eq!(raw[1296..].to_vec(), ints(&case["raw_last"]));
        let mut r = RandomState::new(seed);
        for (want, n) in
            case["shuffles"].as_array().unwrap().iter().zip([1, 2, 3, 10, 37, 100, 1000])
        {
            let mut a: Vec<i64> = (0..n).collect();
            r.shuffle(&mut a);
            let got = if n <= 100 { a } else { [&a[..20], &a[a.len() - 20..]].concat() };
            assert_eq!(got, ints(want), "seed {seed} n {n}");
        }
    }
}

#[test]
fn pcg64_integers_match_numpy() {
    let f = load("numpy_rng.json");
    for case in f["pcg"].as_array().unwrap() {
        let (seed, n) = (case["seed"].as_u64().unwrap(), case["n"].as_u64().unwrap() as usize);
        let (lo, hi) =
            (case["low"].as_i64().unwrap() as i32, case["high"].as_i64().unwrap() as i32);
        let v = Pcg64Generator::new(seed).integers_i32(lo, hi, n);
        let v: Vec<i64> = v.into_iter().map(|x| x as i64).collect();
        assert_eq!(v[..40.min(n)].to_vec(), ints(&case["first"]), "seed {seed}");
        assert_eq!(v[n - 5..].to_vec(), ints(&case["last"]));
        assert_eq!(v.iter().sum::<i64>(), case["sum"].as_i64().unwrap());
    }
}

#[test]
fn indexed_reader_and_writer_match_megatron_bytes() {
    let corpora = load("corpora.json");
    let dir = tempfile::tempdir().unwrap();
    // corpus_a: one sequence per document, uint16.
    let a = IndexedDataset::open(fixtures().join("corpus_a")).unwrap();
    assert_eq!(a.dtype(), DType::U16);
    let docs_a = corpora["a"].as_array().unwrap();
    assert_eq!(a.len(), docs_a.len());
    let out = dir.path().join("a");
    let mut w = IndexedDatasetBuilder::new(bin_path(&out), DType::U16).unwrap();
    for (i, d) in docs_a.iter().enumerate() {
        let toks = ints(d);
        assert_eq!(a.get(i, 0, None).unwrap(), toks);
        w.add_document(&toks, &[toks.len()]).unwrap();
    }
    w.finalize(idx_path(&out)).unwrap();
    for ext in ["bin", "idx"] {
        let want = std::fs::read(fixtures().join(format!("corpus_a.{ext}"))).unwrap();
        assert_eq!(std::fs::read(dir.path().join(format!("a.{ext}"))).unwrap(), want, "{ext}");
    }
    // corpus_b: several sentences per document, int32, and a trailing empty document.
    let b = IndexedDataset::open(fixtures().join("corpus_b")).unwrap();
    assert_eq!(b.dtype(), DType::I32);
    let out = dir.path().join("b");
    let mut w = IndexedDatasetBuilder::new(bin_path(&out), DType::I32).unwrap();
    let mut seq = 0;
    for d in corpora["b"].as_array().unwrap() {
        let sents: Vec<Vec<i64>> = d.as_array().unwrap().iter().map(ints).collect();
        if sents.is_empty() {
            w.end_document();
            continue;
        }
        for s in &sents {
            assert_eq!(b.get(seq, 0, None).unwrap(), *s);
            seq += 1;
        }
        let lens: Vec<usize> = sents.iter().map(|s| s.len()).collect();
        w.add_document(&sents.concat(), &lens).unwrap();
    }
    assert_eq!(b.num_documents(), corpora["b"].as_array().unwrap().len());
    w.finalize(idx_path(&out)).unwrap();
    for ext in ["bin", "idx"] {
        let want = std::fs::read(fixtures().join(format!("corpus_b.{ext}"))).unwrap();
        assert_eq!(std::fs::read(dir.path().join(format!("b.{ext}"))).unwrap(), want, "{ext}");
    }
    // Merging (add_index) reproduces the concatenation.
    let out = dir.path().join("ab");
    let mut w = IndexedDatasetBuilder::new(bin_path(&out), DType::U16).unwrap();
    w.add_index(fixtures().join("corpus_a")).unwrap();
    w.add_index(fixtures().join("corpus_a")).unwrap();
    w.finalize(idx_path(&out)).unwrap();
    let ab = IndexedDataset::open(&out).unwrap();
    assert_eq!(ab.len(), 2 * a.len());
    assert_eq!(ab.get(a.len() + 3, 0, None).unwrap(), a.get(3, 0, None).unwrap());
    assert_eq!(ab.document_indices().last().copied(), Some(2 * a.len() as i64));
}

fn params(seed: u32, split: Option<&str>, cache: &Path) -> GptDatasetParams {
    GptDatasetParams {
        random_seed: seed,
        seq_length: 16,
        split: split.map(str::to_string),
        path_to_cache: Some(cache.to_path_buf()),
        ..Default::default()
    }
}

fn prefix(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

fn check_split(got: &PretrainDataset, want: &Value, what: &str) {
    assert_eq!(got.len() as u64, want["len"].as_u64().unwrap(), "{what} len");
    for (i, t) in want["texts"].as_array().unwrap().iter().enumerate() {
        assert_eq!(got.text(i).unwrap(), ints(t), "{what} sample {i}");
    }
    match got {
        PretrainDataset::Gpt(d) => {
            let ix = d.indices();
            if let Some(di) = want.get("document_index") {
                let doc: Vec<i64> = ix.document_index.to_i64();
                assert_eq!(doc, ints(di), "{what} document_index");
                assert_eq!(
                    ix.shuffle_index.to_i64(),
                    ints(&want["shuffle_index"]),
                    "{what} shuffle_index"
                );
            }
            if let Some(si) = want.get("sample_index") {
                let flat: Vec<i64> = ix.sample_index.to_i64();
                let want_flat: Vec<i64> = si.as_array().unwrap().iter().flat_map(ints).collect();
                assert_eq!(flat, want_flat, "{what} sample_index");
            }
        }
        PretrainDataset::Blended(b) => {
            let (di, dsi) = b.blending_indices();
            let di: Vec<i64> = di.to_i64();
            assert_eq!(di, ints(&want["dataset_index"]), "{what} dataset_index");
            assert_eq!(
                dsi.to_i64(),
                ints(&want["dataset_sample_index"]),
                "{what} dataset_sample_index"
            );
            let lens: Vec<i64> = b.datasets().iter().map(|d| d.len() as i64).collect();
            assert_eq!(lens, ints(&want["child_lens"]), "{what} child lens");
        }
    }
}

fn sizes(v: &Value) -> [Option<usize>; 3] {
    std::array::from_fn(|i| v[i].as_u64().map(|x| x as usize))
}

#[test]
fn gpt_and_blended_datasets_match_megatron() {
    let cases = load("gpt_cases.json");
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let seed = case["seed"].as_u64().unwrap() as u32;
        let blend = match name {
            "single_a" | "valid_keep_partial" => {
                Blend { prefixes: vec![prefix("corpus_a")], weights: None }
            }
            "single_b" => Blend { prefixes: vec![prefix("corpus_b")], weights: None },
            "blend_ab" => Blend {
                prefixes: vec![prefix("corpus_a"), prefix("corpus_b")],
                weights: Some(vec![0.3, 0.7]),
            },
            "blend_ab_unweighted" => {
                Blend { prefixes: vec![prefix("corpus_a"), prefix("corpus_b")], weights: None }
            }
            "no_extra" => Blend { prefixes: vec![prefix("corpus_a")], weights: None },
            "per_split" => Blend { prefixes: vec![], weights: None },
            other => panic!("unknown case {other}"),
        };
        let spec = if name == "per_split" {
            let a = Blend { prefixes: vec![prefix("corpus_a")], weights: None };
            let ab = Blend {
                prefixes: vec![prefix("corpus_a"), prefix("corpus_b")],
                weights: Some(vec![1.0, 3.0]),
            };
            BlendSpec::PerSplit([Some(a), Some(ab), None])
        } else {
            BlendSpec::Blend(blend)
        };
        let cache = tempfile::tempdir().unwrap();
        let mut p = params(seed, case["split"].as_str(), cache.path());
        if name == "no_extra" {
            p.add_extra_token_to_sequence = false;
        }
        if name == "valid_keep_partial" || name == "no_extra" {
            p.drop_last_partial_validation_sequence = false;
            p.pad_id = case["pad"].as_i64().unwrap();
        }
        for pass in 0..2 {
            // The second pass loads every index from the cache written by the first.
            let built = build_gpt_datasets(&p, &spec, sizes(&case["sizes"])).unwrap();
            for (i, want) in case["splits"].as_array().unwrap().iter().enumerate() {
                let what = format!("{name} seed {seed} split {i} pass {pass}");
                match (&built[i], want.is_null()) {
                    (None, true) => {}
                    (Some(got), false) => check_split(got, want, &what),
                    (g, _) => panic!(
                        "{what}: built {:?} but fixture null={}",
                        g.is_some(),
                        want.is_null()
                    ),
                }
            }
        }
        assert!(std::fs::read_dir(cache.path()).unwrap().count() > 0, "cache files written");
    }
}

#[test]
fn sample_tensors_match_megatron_getitem() {
    let items = load("gpt_items.json");
    let cache = tempfile::tempdir().unwrap();
    for it in items.as_array().unwrap() {
        if let Some(masks) = it.get("attention_masks") {
            let p = params(1234, Some("90,8,2"), cache.path());
            let blend =
                BlendSpec::Blend(Blend { prefixes: vec![prefix("corpus_a")], weights: None });
            let ds = build_gpt_datasets(&p, &blend, [Some(50), Some(5), Some(5)]).unwrap();
            let train = ds[0].as_ref().unwrap();
            assert_eq!(masks.as_array().unwrap().len(), 2);
            for m in masks.as_array().unwrap() {
                let s = train.get(m["idx"].as_u64().unwrap() as usize).unwrap();
                let got: Vec<i64> =
                    ltor_attention_mask(&s.tokens, 0, true).into_iter().map(i64::from).collect();
                assert_eq!(got, ints(&m["mask"]), "attention mask of sample {}", m["idx"]);
            }
            continue;
        }
        let mut p = params(1234, Some("90,8,2"), cache.path());
        p.reset_position_ids = it["rp"].as_bool().unwrap();
        p.eod_mask_loss = it["em"].as_bool().unwrap();
        p.pad_id = it["pad"].as_i64().unwrap_or(-1);
        p.add_extra_token_to_sequence = it["extra"].as_bool().unwrap();
        let blend = BlendSpec::Blend(Blend { prefixes: vec![prefix("corpus_a")], weights: None });
        let ds = build_gpt_datasets(&p, &blend, [Some(50), Some(5), Some(5)]).unwrap();
        let train = ds[0].as_ref().unwrap();
        let s = match it["idx"].as_u64() {
            Some(i) => train.get(i as usize).unwrap(),
            None => train.padding_sample().unwrap(),
        };
        let what = format!("{it:?}").chars().take(60).collect::<String>();
        assert_eq!(s.tokens, ints(&it["tokens"]), "{what}");
        assert_eq!(s.labels, ints(&it["labels"]), "{what}");
        assert_eq!(s.position_ids, ints(&it["position_ids"]), "{what}");
        let lm: Vec<f32> = it["loss_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(s.loss_mask, lm, "{what}");
    }
}

#[test]
fn mock_dataset_matches_megatron() {
    let m = load("mock.json");
    let p = GptDatasetParams {
        random_seed: 1234,
        seq_length: m["seq"].as_u64().unwrap() as usize,
        split: None,
        eod_id: m["eod"].as_i64().unwrap(),
        vocab_size: Some(m["vocab"].as_u64().unwrap() as usize),
        ..Default::default()
    };
    let built = build_gpt_datasets(&p, &BlendSpec::Mock, sizes(&m["sizes"])).unwrap();
    for (i, want) in m["splits"].as_array().unwrap().iter().enumerate() {
        check_split(built[i].as_ref().unwrap(), want, &format!("mock split {i}"));
    }
    let s = built[0].as_ref().unwrap().get(0).unwrap();
    assert!(s.tokens.iter().all(|&t| (0..1000).contains(&t)));
}
