//! Tokenizers against ids produced by HF `tokenizers` / transformers (scripts/fixtures/data_tokenizers.py).
use std::path::{Path, PathBuf};

use mbridge::data::tokenizer::{
    build_tokenizer, Gpt2BpeTokenizer, HfTokenizer, Tokenizer, TokenizerSpec,
};

fn tok_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tok")
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn hf_and_gpt2_match_python() {
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok_dir().join("expected.json")).unwrap())
            .unwrap();
    let hf = HfTokenizer::from_path(tok_dir()).unwrap();
    assert_eq!(hf.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    assert_eq!(hf.eod(), exp["eod"].as_i64().unwrap());
    assert_eq!(hf.pad(), exp["pad"].as_i64());
    assert_eq!(mbridge::data::tokenizer::dataset_pad_id(&hf, false), 1);
    let g =
        Gpt2BpeTokenizer::from_files(tok_dir().join("vocab.json"), tok_dir().join("merges.txt"))
            .unwrap();
    assert_eq!(g.vocab_size() as u64, exp["gpt2_vocab_size"].as_u64().unwrap());
    assert_eq!(g.eod(), exp["eod"].as_i64().unwrap());
    for c in exp["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let got = hf.encode(text).unwrap();
        assert_eq!(got, ids(&c["hf"]), "hf {text:?}");
        assert_eq!(hf.decode(&got).unwrap(), c["decoded"].as_str().unwrap());
        assert_eq!(g.encode(text).unwrap(), ids(&c["gpt2"]), "gpt2 {text:?}");
    }
    // The file path and the spec-driven constructor agree.
    let spec = TokenizerSpec {
        tokenizer_model: Some(tok_dir().join("tokenizer.json")),
        ..Default::default()
    };
    assert_eq!(build_tokenizer(&spec).unwrap().encode("fox").unwrap(), hf.encode("fox").unwrap());
}

#[test]
fn tokenizer_errors_name_the_problem() {
    let missing = HfTokenizer::from_path("/nonexistent/tokenizer.json").err().unwrap();
    assert!(missing.to_string().contains("not found"), "{missing}");
    let spm = HfTokenizer::from_path("/x/tokenizer.model").err().unwrap();
    assert!(spm.to_string().contains("SentencePiece"), "{spm}");
    let spec = TokenizerSpec { tokenizer_type: Some("Bogus".into()), ..Default::default() };
    assert!(build_tokenizer(&spec).err().unwrap().to_string().contains("unknown --tokenizer-type"));
    let gpt2 = Gpt2BpeTokenizer::from_files(tok_dir().join("vocab.json"), "/nope/merges.txt")
        .err()
        .unwrap();
    assert!(gpt2.to_string().contains("--merge-file"), "{gpt2}");
}
