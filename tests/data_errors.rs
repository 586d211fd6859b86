//! Bad inputs give clear errors naming the file and what was expected; caches never lie.
use std::path::{Path, PathBuf};

use mbridge::data::indexed::{bin_path, idx_path};
use mbridge::data::{
    build_gpt_datasets, parse_blend, Blend, BlendSpec, GptDatasetParams, IndexedDataset,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

/// Copy corpus_a into `dir` as `name`, letting `edit` change the .idx bytes.
fn copy_with(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let p = dir.join(name);
    let mut idx = std::fs::read(idx_path(&fixture("corpus_a"))).unwrap();
    edit(&mut idx);
    std::fs::write(idx_path(&p), idx).unwrap();
    std::fs::copy(bin_path(&fixture("corpus_a")), bin_path(&p)).unwrap();
    p
}

fn open_err(p: &Path) -> String {
    format!("{:#}", IndexedDataset::open(p).unwrap_err())
}

#[test]
fn indexed_dataset_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = open_err(&dir.path().join("nothing"));
    assert!(missing.contains("nothing.idx"), "{missing}");
    let p = copy_with(dir.path(), "magic", |b| b[0] = b'X');
    assert!(open_err(&p).contains("wrong magic"));
    let p = copy_with(dir.path(), "version", |b| b[9] = 2);
    assert!(open_err(&p).contains("version 2, expected 1"));
    let p = copy_with(dir.path(), "dtype", |b| b[17] = 9);
    assert!(open_err(&p).contains("unknown dtype code 9"));
    let p = copy_with(dir.path(), "trunc", |b| b.truncate(b.len() - 5));
    let e = open_err(&p);
    assert!(e.contains("truncated") && e.contains("trunc.idx"), "{e}");
    let p = copy_with(dir.path(), "header", |b| b.truncate(20));
    assert!(open_err(&p).contains("truncated header"));
    let p = copy_with(dir.path(), "nobin", |_| {});
    std::fs::remove_file(bin_path(&p)).unwrap();
    assert!(open_err(&p).contains("nobin.bin"));
    let p = copy_with(dir.path(), "shortbin", |_| {});
    let bin = std::fs::read(bin_path(&p)).unwrap();
    std::fs::write(bin_path(&p), &bin[..bin.len() - 2]).unwrap();
    let e = open_err(&p);
    assert!(e.contains("shortbin.bin") && e.contains("expects"), "{e}");
    let p = copy_with(dir.path(), "docidx", |b| {
        let n = b.len();
        b[n - 8] = 99;
    });
    assert!(open_err(&p).contains("document_indices[-1]"));
}

fn params(cache: &Path) -> GptDatasetParams {
    GptDatasetParams {
        seq_length: 16,
        split: Some("90,8,2".into()),
        path_to_cache: Some(cache.into()),
        ..Default::default()
    }
}

fn single(p: &Path) -> BlendSpec {
    BlendSpec::Blend(Blend { prefixes: vec![p.display().to_string()], weights: None })
}

#[test]
fn bad_split_blend_and_vocab() {
    let cache = tempfile::tempdir().unwrap();
    let a = fixture("corpus_a");
    let mut p = params(cache.path());
    p.split = Some("1,2,3,4".into());
    let e = format!("{:#}", build_gpt_datasets(&p, &single(&a), [Some(10); 3]).unwrap_err());
    assert!(e.contains("at most 3"), "{e}");
    p.split = Some("999,1,0".into());
    // 80 sequences: valid gets round(0.999*80)=80..80, empty but 10 samples are needed.
    let e = format!(
        "{:#}",
        build_gpt_datasets(&p, &single(&a), [Some(10), Some(10), Some(0)]).unwrap_err()
    );
    assert!(e.contains("valid split") && e.contains("empty"), "{e}");
    // Asking nothing of the empty split is fine.
    let ok = build_gpt_datasets(&p, &single(&a), [Some(10), Some(0), Some(0)]).unwrap();
    assert!(ok[0].is_some() && ok[1].is_none() && ok[2].is_none());
    let bad: Vec<serde_json::Value> = serde_json::from_str(r#"[1, "a", "b"]"#).unwrap();
    assert!(parse_blend(&bad).is_err());
    let p = params(cache.path());
    let weighted = BlendSpec::Blend(Blend {
        prefixes: vec![a.display().to_string(), "x".into()],
        weights: Some(vec![1.0, 1.0]),
    });
    let e = format!("{:#}", build_gpt_datasets(&p, &weighted, [Some(10); 3]).unwrap_err());
    assert!(e.contains("\"x\"") && e.contains("x.idx"), "{e}");
    let e = format!("{:#}", build_gpt_datasets(&p, &weighted, [None; 3]).unwrap_err());
    assert!(e.contains("sample count"), "{e}");
    // corpus_b holds ids up to 70000: a 1000-word vocabulary is a mismatch.
    let mut p = params(cache.path());
    p.vocab_size = Some(1000);
    let ds = build_gpt_datasets(&p, &single(&fixture("corpus_b")), [Some(10); 3]).unwrap();
    let e = format!("{:#}", ds[0].as_ref().unwrap().get(0).unwrap_err());
    assert!(e.contains("outside the tokenizer vocabulary"), "{e}");
    let e = format!(
        "{:#}",
        build_gpt_datasets(&params(cache.path()), &BlendSpec::Mock, [Some(1); 3]).unwrap_err()
    );
    assert!(e.contains("vocab size"), "{e}");
}

#[test]
fn cache_is_reused_only_for_the_same_config() {
    let cache = tempfile::tempdir().unwrap();
    let a = fixture("corpus_a");
    let p = params(cache.path());
    let first = build_gpt_datasets(&p, &single(&a), [Some(50), Some(5), Some(5)]).unwrap();
    let files = || {
        let mut v: Vec<String> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let n = files().len();
    assert_eq!(n, 12, "{:?}", files());
    assert!(files().iter().any(|f| f.ends_with("-GPTDataset-train-shuffle_index.npy")));
    // Same config: no new files, same samples.
    let again = build_gpt_datasets(&p, &single(&a), [Some(50), Some(5), Some(5)]).unwrap();
    assert_eq!(files().len(), n);
    assert_eq!(
        first[0].as_ref().unwrap().get(7).unwrap(),
        again[0].as_ref().unwrap().get(7).unwrap()
    );
    // Another seed: new entries, different order.
    let mut p2 = p.clone();
    p2.random_seed = 99;
    let other = build_gpt_datasets(&p2, &single(&a), [Some(50), Some(5), Some(5)]).unwrap();
    assert_eq!(files().len(), 2 * n);
    let t = |d: &[Option<mbridge::data::PretrainDataset>; 3]| {
        (0..20).map(|i| d[0].as_ref().unwrap().text(i).unwrap()).collect::<Vec<_>>()
    };
    assert_ne!(t(&first), t(&other));
    // A corrupted cache array is detected and rebuilt, not trusted.
    let shuffle = files().into_iter().find(|f| f.ends_with("train-shuffle_index.npy")).unwrap();
    let path = cache.path().join(&shuffle);
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    bytes.truncate(len - 4);
    std::fs::write(&path, bytes).unwrap();
    let rebuilt = build_gpt_datasets(&p, &single(&a), [Some(50), Some(5), Some(5)]).unwrap();
    let rebuilt2 = build_gpt_datasets(&p2, &single(&a), [Some(50), Some(5), Some(5)]).unwrap();
    assert!(t(&rebuilt) == t(&first) || t(&rebuilt2) == t(&other));
    assert_eq!(t(&rebuilt), t(&first));
    assert_eq!(t(&rebuilt2), t(&other));
}
