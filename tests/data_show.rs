//! show-samples rendering and micro-batch collation over a real indexed dataset.
use std::path::Path;

use mbridge::data::sampler::{collate, PretrainingSampler};
use mbridge::data::show::render_samples;
use mbridge::data::tokenizer::NullTokenizer;
use mbridge::data::{build_gpt_datasets, Blend, BlendSpec, GptDatasetParams};

#[test]
fn render_and_collate() {
    let cache = tempfile::tempdir().unwrap();
    let prefix = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/corpus_a");
    let p = GptDatasetParams {
        seq_length: 8,
        split: Some("90,8,2".into()),
        path_to_cache: Some(cache.path().into()),
        ..Default::default()
    };
    let blend =
        BlendSpec::Blend(Blend { prefixes: vec![prefix.display().to_string()], weights: None });
    let ds = build_gpt_datasets(&p, &blend, [Some(20), Some(4), Some(2)]).unwrap();
    let train = ds[0].as_ref().unwrap();
    let tok = NullTokenizer::new(1000);
    let out = render_samples(train, 0, 2, Some(&tok)).unwrap();
    let s0 = train.get(0).unwrap();
    assert!(out.contains("--- sample 0 (dataset 0): 8 tokens"), "{out}");
    assert!(out.contains(&format!("tokens: {:?}", s0.tokens)), "{out}");
    let words: Vec<String> = s0.tokens.iter().map(|t| t.to_string()).collect();
    assert!(out.contains(&words.join(" ")), "{out}");
    assert!(out.contains("--- sample 1"));
    assert!(!out.contains("--- sample 2"));
    // Two DP ranks of micro-batch 2 cover the first global batch without overlap.
    let b0 = PretrainingSampler::new(train.len(), 0, 2, 0, 2, true, false).unwrap().next().unwrap();
    let b1 = PretrainingSampler::new(train.len(), 0, 2, 1, 2, true, false).unwrap().next().unwrap();
    let batch = collate(train, &b1).unwrap();
    assert_eq!((batch.batch_size, batch.seq_length), (2, 8));
    assert_eq!(batch.tokens[..8], train.get(2).unwrap().tokens[..]);
    assert_eq!(b0, vec![Some(0), Some(1)]);
    let padded = collate(train, &[None]).unwrap();
    assert!(padded.loss_mask.iter().all(|&m| m == 0.0));
}
