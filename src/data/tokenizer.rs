//! Tokenizers with Megatron's semantics: HF `tokenizer.json`, GPT-2 BPE (vocab.json +
//! merges.txt), and the null tokenizer. SentencePiece `.model` files have no pure-Rust reader
//! here and are refused with an explanation.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// Token ids with the byte range `[start, end)` of each token in the encoded text.
pub type IdsWithOffsets = (Vec<i64>, Vec<(usize, usize)>);

/// What preprocessing, datasets and `show-samples` need from a tokenizer.
pub trait Tokenizer: Send + Sync {
    /// Text → ids, without special tokens (Megatron's `tokenize`).
    fn encode(&self, text: &str) -> Result<Vec<i64>>;
    /// Ids → text (Megatron's `detokenize`).
    fn decode(&self, ids: &[i64]) -> Result<String>;
    /// End-of-document id appended by `--append-eod`.
    fn eod(&self) -> i64;
    /// Pad id, if the tokenizer defines one.
    fn pad(&self) -> Option<i64>;
    /// Unpadded vocabulary size (including added tokens).
    fn vocab_size(&self) -> usize;
    /// Text → (ids, byte offsets `[start, end)` of each token in `text`), without special
    /// tokens. Chat templating needs it to map assistant character spans onto tokens.
    fn encode_with_offsets(&self, _text: &str) -> Result<IdsWithOffsets> {
        bail!("this tokenizer cannot report token offsets; chat data needs a HuggingFace tokenizer.json")
    }
    /// The HF chat template (tokenizer_config.json `chat_template`), if any.
    fn chat_template(&self) -> Option<&str> {
        None
    }
    /// A special token's text from tokenizer_config.json (`"bos_token"`, `"eos_token"`,
    /// `"pad_token"`, `"unk_token"`, `"sep_token"`), as chat templates see it.
    fn special_token(&self, _name: &str) -> Option<&str> {
        None
    }
    /// Beginning-of-sequence id, if the tokenizer defines one (`add_bos`).
    fn bos(&self) -> Option<i64> {
        None
    }
}

/// `ceil(V / (divisible_by·tp)) · divisible_by·tp`: Megatron's padded embedding size.
pub fn padded_vocab_size(
    vocab_size: usize,
    make_vocab_size_divisible_by: usize,
    tp: usize,
) -> usize {
    let m = (make_vocab_size_divisible_by * tp).max(1);
    vocab_size.div_ceil(m) * m
}

/// The pad id GPTDataset uses (`MegatronDataset._pad_token_id`): the tokenizer's pad, or -1
/// when it has none or when it collides with EOD and `allow_ambiguous_pad_tokens` is false
/// (Qwen's pad is its EOD: masking it would drop every document end from the loss).
pub fn dataset_pad_id(tok: &dyn Tokenizer, allow_ambiguous_pad_tokens: bool) -> i64 {
    match tok.pad() {
        Some(p) if p == tok.eod() && !allow_ambiguous_pad_tokens => -1,
        Some(p) => p,
        None => -1,
    }
}

fn to_u32(ids: &[i64], vocab: usize) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&i| {
            ensure!(
                i >= 0 && (i as usize) < vocab,
                "token id {i} outside the vocabulary of {vocab}"
            );
            Ok(i as u32)
        })
        .collect()
}

/// A Hugging Face `tokenizers` tokenizer (tokenizer.json), as Megatron's HuggingFaceTokenizer.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eod: i64,
    pad: Option<i64>,
    bos: Option<i64>,
    add_special_tokens: bool,
    /// `chat_template` of tokenizer_config.json (the `default` one when it is a list).
    chat_template: Option<String>,
    /// bos/eos/pad/unk/sep token texts from tokenizer_config.json.
    special_tokens: Vec<(String, String)>,
}

/// Read a special token (string or `{"content": ...}`) from tokenizer_config.json.
fn config_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v.get("content")?.as_str().map(str::to_string),
    }
}

impl HfTokenizer {
    /// Load from a `tokenizer.json` file or a directory holding one (an HF model or an imported
    /// checkpoint). EOS (= EOD) and pad come from a sibling `tokenizer_config.json` when present,
    /// else from well-known token names.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if file.extension().is_some_and(|e| e == "model") {
            bail!("{} looks like a SentencePiece model; {}", file.display(), SENTENCEPIECE_MSG);
        }
        ensure!(
            file.is_file(),
            "tokenizer file {} not found (expected tokenizer.json)",
            file.display()
        );
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", file.display()))?;
        let cfg: serde_json::Value = file
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .filter(|p| p.is_file())
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let id = |t: &str| inner.token_to_id(t).map(|i| i as i64);
        let eod = config_token(&cfg, "eos_token")
            .and_then(|t| id(&t))
            .or_else(|| {
                ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>"]
                    .iter()
                    .find_map(|t| id(t))
            })
            .with_context(|| format!("{}: no EOS/EOD token found", file.display()))?;
        let pad = config_token(&cfg, "pad_token").and_then(|t| id(&t));
        let bos = config_token(&cfg, "bos_token").and_then(|t| id(&t));
        let special_tokens = ["bos_token", "eos_token", "pad_token", "unk_token", "sep_token"]
            .iter()
            .filter_map(|k| config_token(&cfg, k).map(|t| (k.to_string(), t)))
            .collect();
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(HfTokenizer {
            inner,
            eod,
            pad,
            bos,
            add_special_tokens: false,
            chat_template,
            special_tokens,
        })
    }

    /// Make `encode` add the tokenizer's special tokens (e.g. BOS), as calling the HF tokenizer
    /// object directly does; the default follows the spec (no special tokens).
    pub fn with_special_tokens(mut self, add: bool) -> Self {
        self.add_special_tokens = add;
        self
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode_fast(text, self.add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }
    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = to_u32(ids, self.vocab_size())?;
        self.inner.decode(&ids, false).map_err(|e| anyhow::anyhow!("detokenization failed: {e}"))
    }
    fn eod(&self) -> i64 {
        self.eod
    }
    fn pad(&self) -> Option<i64> {
        self.pad
    }
    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    fn encode_with_offsets(&self, text: &str) -> Result<IdsWithOffsets> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        Ok((enc.get_ids().iter().map(|&i| i as i64).collect(), enc.get_offsets().to_vec()))
    }
    fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn bos(&self) -> Option<i64> {
        self.bos
    }
}

/// Megatron's GPT2BPETokenizer: byte-level BPE from `vocab.json` + `merges.txt`, EOD
/// `<|endoftext|>`, no pad.
pub struct Gpt2BpeTokenizer {
    inner: tokenizers::Tokenizer,
    eod: i64,
    vocab: usize,
}

impl Gpt2BpeTokenizer {
    /// Load `vocab.json` and `merges.txt`.
    pub fn from_files(vocab_file: impl AsRef<Path>, merge_file: impl AsRef<Path>) -> Result<Self> {
        use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDec;
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let (v, m) = (vocab_file.as_ref(), merge_file.as_ref());
        for (p, what) in [(v, "--vocab-file"), (m, "--merge-file")] {
            ensure!(p.is_file(), "{what} {} not found", p.display());
        }
        let bpe = BPE::from_file(&v.display().to_string(), &m.display().to_string())
            .build()
            .map_err(|e| {
                anyhow::anyhow!("cannot load GPT-2 BPE from {} / {}: {e}", v.display(), m.display())
            })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDec::default()));
        let eod = inner
            .token_to_id("<|endoftext|>")
            .with_context(|| format!("{} has no <|endoftext|> token", v.display()))?
            as i64;
        let vocab = inner.get_vocab_size(true);
        Ok(Gpt2BpeTokenizer { inner, eod, vocab })
    }
}

impl Tokenizer for Gpt2BpeTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }
    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = to_u32(ids, self.vocab)?;
        self.inner.decode(&ids, false).map_err(|e| anyhow::anyhow!("detokenization failed: {e}"))
    }
    fn eod(&self) -> i64 {
        self.eod
    }
    fn pad(&self) -> Option<i64> {
        None
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

/// Megatron's `_NullTokenizer(vocab_size)`: text is whitespace-separated integer ids; EOD is
/// `vocab_size` (one past the given size) and the reported vocab size is `vocab_size + 1`,
/// i.e. EOD = `vocab_size() - 1`.
#[derive(Debug, Clone)]
pub struct NullTokenizer {
    vocab_size_without_eod: usize,
}

impl NullTokenizer {
    /// `--vocab-size N`.
    pub fn new(vocab_size: usize) -> Self {
        NullTokenizer { vocab_size_without_eod: vocab_size }
    }
}

impl Tokenizer for NullTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        text.split_whitespace()
            .map(|w| {
                let id: i64 = w
                    .parse()
                    .with_context(|| format!("NullTokenizer: {w:?} is not an integer id"))?;
                ensure!(
                    id >= 0 && (id as usize) < self.vocab_size(),
                    "NullTokenizer: id {id} outside the vocabulary of {}",
                    self.vocab_size()
                );
                Ok(id)
            })
            .collect()
    }
    fn decode(&self, ids: &[i64]) -> Result<String> {
        Ok(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "))
    }
    fn eod(&self) -> i64 {
        self.vocab_size_without_eod as i64
    }
    fn pad(&self) -> Option<i64> {
        None
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size_without_eod + 1
    }
}

const SENTENCEPIECE_MSG: &str = "SentencePiece .model files cannot be read (no pure-Rust \
    SentencePiece reader is available); use the model's tokenizer.json instead (HF model \
    directories ship one; transformers' `AutoTokenizer.from_pretrained(...).save_pretrained(dir)` \
    writes it) with --tokenizer-type HuggingFaceTokenizer";

/// Tokenizer selection with Megatron's argument names.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSpec {
    /// `--tokenizer-type` (HuggingFaceTokenizer, GPT2BPETokenizer, NullTokenizer,
    /// SentencePieceTokenizer, ...); None picks HuggingFace when a model is given.
    pub tokenizer_type: Option<String>,
    /// `--tokenizer-model`: tokenizer.json or a directory holding one.
    pub tokenizer_model: Option<PathBuf>,
    /// `--vocab-file` (GPT-2 BPE).
    pub vocab_file: Option<PathBuf>,
    /// `--merge-file` (GPT-2 BPE).
    pub merge_file: Option<PathBuf>,
    /// `--vocab-size` (NullTokenizer).
    pub vocab_size: Option<usize>,
}

/// Build the tokenizer described by `spec`.
pub fn build_tokenizer(spec: &TokenizerSpec) -> Result<Box<dyn Tokenizer>> {
    let ty = match (&spec.tokenizer_type, &spec.tokenizer_model, &spec.vocab_file) {
        (Some(t), _, _) => t.clone(),
        (None, Some(_), _) => "HuggingFaceTokenizer".into(),
        (None, None, Some(_)) => "GPT2BPETokenizer".into(),
        (None, None, None) if spec.vocab_size.is_some() => "NullTokenizer".into(),
        _ => bail!("no tokenizer given: pass --tokenizer-model, --vocab-file/--merge-file or --tokenizer-type NullTokenizer --vocab-size N"),
    };
    Ok(match ty.as_str() {
        "HuggingFaceTokenizer" => {
            let m = spec.tokenizer_model.as_ref().context("HuggingFaceTokenizer needs --tokenizer-model")?;
            Box::new(HfTokenizer::from_path(m)?)
        }
        "GPT2BPETokenizer" => {
            let v = spec.vocab_file.as_ref().context("GPT2BPETokenizer needs --vocab-file")?;
            let m = spec.merge_file.as_ref().context("GPT2BPETokenizer needs --merge-file")?;
            Box::new(Gpt2BpeTokenizer::from_files(v, m)?)
        }
        "NullTokenizer" => Box::new(NullTokenizer::new(spec.vocab_size.context("NullTokenizer needs --vocab-size")?)),
        "SentencePieceTokenizer" | "GPTSentencePieceTokenizer" | "Llama2Tokenizer" => {
            bail!("--tokenizer-type {ty}: {SENTENCEPIECE_MSG}")
        }
        other => bail!(
            "unknown --tokenizer-type {other:?}; expected HuggingFaceTokenizer, GPT2BPETokenizer or NullTokenizer"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_tokenizer_and_padding() {
        let t = NullTokenizer::new(100);
        assert_eq!(t.encode("1 2  30\n4").unwrap(), vec![1, 2, 30, 4]);
        assert_eq!(t.eod(), 100);
        assert_eq!(t.vocab_size(), 101);
        assert!(t.encode("1 x").is_err());
        assert!(t.encode("101").is_err());
        assert_eq!(t.decode(&[1, 2]).unwrap(), "1 2");
        assert_eq!(dataset_pad_id(&t, false), -1);
        assert_eq!(padded_vocab_size(50257, 128, 1), 50304);
        assert_eq!(padded_vocab_size(50257, 128, 2), 50432);
        assert_eq!(padded_vocab_size(128256, 128, 8), 129024);
        let spec = TokenizerSpec {
            tokenizer_type: Some("SentencePieceTokenizer".into()),
            ..Default::default()
        };
        let err = build_tokenizer(&spec).err().expect("SentencePiece is refused");
        assert!(err.to_string().contains("tokenizer.json"));
    }
}
