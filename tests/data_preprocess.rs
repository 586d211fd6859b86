//! preprocess-data: output layout, order, EOD, several keys, errors leave no files.
use std::path::Path;

use mbridge::data::indexed::{bin_path, idx_path};
use mbridge::data::preprocess::{preprocess, InputFormat, PreprocessConfig};
use mbridge::data::tokenizer::{HfTokenizer, NullTokenizer, Tokenizer};
use mbridge::data::{DType, IndexedDataset};

fn cfg(input: &Path, prefix: &Path, keys: &[&str]) -> PreprocessConfig {
    PreprocessConfig {
        input: input.to_path_buf(),
        input_format: InputFormat::Auto,
        json_keys: keys.iter().map(|k| k.to_string()).collect(),
        output_prefix: prefix.display().to_string(),
        append_eod: true,
        workers: 3,
        log_interval: 0,
        skip_bad_lines: false,
        show_progress: false,
    }
}

#[test]
fn null_tokenizer_jsonl_matches_builder_layout() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut text = String::new();
    // Many documents so several rayon batches/threads are involved; order must hold.
    for d in 0..5000 {
        let n = d % 7;
        let body: Vec<String> = (0..n).map(|i| ((d + i) % 90).to_string()).collect();
        text.push_str(&format!(
            "{{\"text\": \"{}\", \"title\": [\"{}\", \"\", \"5\"]}}\n",
            body.join(" "),
            d % 90
        ));
    }
    std::fs::write(&input, text).unwrap();
    let tok = NullTokenizer::new(100);
    let prefix = dir.path().join("out/corpus");
    let r = preprocess(&cfg(&input, &prefix, &["text", "title"]), &tok).unwrap();
    assert_eq!(r.documents, 5000);
    assert_eq!(r.dtype, DType::U16);
    let text_ds = IndexedDataset::open(dir.path().join("out/corpus_text_document")).unwrap();
    assert_eq!(text_ds.num_documents(), 5000);
    for d in [0usize, 1, 6, 4999] {
        let n = d % 7;
        let mut want: Vec<i64> = (0..n).map(|i| ((d + i) % 90) as i64).collect();
        if n > 0 {
            want.push(100); // EOD
        }
        let got: Vec<i64> = {
            let docs = text_ds.document_indices();
            (docs[d] as usize..docs[d + 1] as usize)
                .flat_map(|s| text_ds.get(s, 0, None).unwrap())
                .collect()
        };
        assert_eq!(got, want, "document {d}");
    }
    // A list value is a list of sentences: empty sentences dropped, EOD joins the last one.
    let title = IndexedDataset::open(dir.path().join("out/corpus_title_document")).unwrap();
    assert_eq!(title.len(), 2 * 5000);
    assert_eq!(title.get(1, 0, None).unwrap(), vec![5, 100]);
    assert_eq!(title.get(2, 0, None).unwrap(), vec![1]);
    // No temporary files are left.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn hf_tokenizer_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "The lazy fox.\n\nreads datasets\n").unwrap();
    let tok = HfTokenizer::from_path(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tok"),
    )
    .unwrap();
    let prefix = dir.path().join("t");
    preprocess(&cfg(&input, &prefix, &["text"]), &tok).unwrap();
    let ds = IndexedDataset::open(dir.path().join("t_text_document")).unwrap();
    assert_eq!(ds.num_documents(), 3);
    let mut want = tok.encode("The lazy fox.").unwrap();
    want.push(tok.eod());
    assert_eq!(ds.get(0, 0, None).unwrap(), want);
    // The empty line is an empty document: a boundary without sequences.
    assert_eq!(ds.document_indices(), vec![0, 1, 1, 2]);
}

#[test]
fn bad_line_reports_line_number_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"1 2\"}\n{\"text\": \"3\"}\n{not json\n{\"text\": \"4\"}\n",
    )
    .unwrap();
    let tok = NullTokenizer::new(10);
    let prefix = dir.path().join("bad");
    let err = preprocess(&cfg(&input, &prefix, &["text"]), &tok).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("in.jsonl:3") && msg.contains("invalid JSON"), "{msg}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the input remains");
    // Missing key and non-integer ids are errors too.
    std::fs::write(&input, "{\"body\": \"1\"}\n").unwrap();
    let msg = format!("{:#}", preprocess(&cfg(&input, &prefix, &["text"]), &tok).unwrap_err());
    assert!(msg.contains(":1") && msg.contains("missing"), "{msg}");
    // --skip-bad-lines skips and counts.
    std::fs::write(&input, "{\"text\": \"1 2\"}\n{oops\n{\"text\": \"3\"}\n").unwrap();
    let mut c = cfg(&input, &prefix, &["text"]);
    c.skip_bad_lines = true;
    let r = preprocess(&c, &tok).unwrap();
    assert_eq!((r.documents, r.skipped_lines), (2, 1));
    let ds = IndexedDataset::open(dir.path().join("bad_text_document")).unwrap();
    assert_eq!(ds.get(1, 0, None).unwrap(), vec![3, 10]);
    assert!(bin_path(&dir.path().join("bad_text_document")).is_file());
    assert!(idx_path(&dir.path().join("bad_text_document")).is_file());
    // Missing input.
    let msg = format!(
        "{:#}",
        preprocess(&cfg(&dir.path().join("nope.jsonl"), &prefix, &["text"]), &tok).unwrap_err()
    );
    assert!(msg.contains("nope.jsonl"), "{msg}");
}

#[test]
fn output_is_byte_identical_to_megatron_reference() {
    // Reference written by scripts/fixtures/data_preprocess.py (Megatron's Encoder logic +
    // megatron-core's IndexedDatasetBuilder) for the same JSONL and tokenizer.
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
    let dir = tempfile::tempdir().unwrap();
    let tok = HfTokenizer::from_path(fx.join("tok")).unwrap();
    let prefix = dir.path().join("mine");
    let mut c = cfg(&fx.join("preprocess_input.jsonl"), &prefix, &["text", "title"]);
    c.workers = 2;
    preprocess(&c, &tok).unwrap();
    for key in ["text", "title"] {
        for ext in ["bin", "idx"] {
            let mine =
                std::fs::read(dir.path().join(format!("mine_{key}_document.{ext}"))).unwrap();
            let want =
                std::fs::read(fx.join(format!("preprocess_ref_{key}_document.{ext}"))).unwrap();
            assert_eq!(mine, want, "{key} .{ext}");
        }
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: mbridge::cli::preprocess_data::PreprocessDataArgs,
}

#[test]
fn megatron_flag_names_parse_and_run() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"1 2 3\", \"title\": \"4\"}\n").unwrap();
    let prefix = dir.path().join("cli");
    let argv = |extra: &[&str]| {
        let mut v =
            vec!["mbridge", "--input", input.to_str().unwrap(), "--json-keys", "text", "title"];
        v.extend(["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]);
        v.extend(["--output-prefix", prefix.to_str().unwrap(), "--append-eod", "--workers", "2"]);
        v.extend(["--log-interval", "1"]);
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cli = Cli::try_parse_from(argv(&[])).unwrap();
    mbridge::cli::preprocess_data::run(cli.args).unwrap();
    let ds = IndexedDataset::open(dir.path().join("cli_title_document")).unwrap();
    assert_eq!(ds.get(0, 0, None).unwrap(), vec![4, 100]);
    let cli = Cli::try_parse_from(argv(&["--split-sentences"])).unwrap();
    let e = mbridge::cli::preprocess_data::run(cli.args).unwrap_err();
    assert!(e.to_string().contains("--split-sentences"), "{e}");
}
