//! `import-hf org/name` downloads through the Hub API without network: a hand-written HTTP/1.1
//! server on 127.0.0.1 answers the requests hf-hub 0.4's sync client makes (`GET
//! /api/models/{repo}/revision/main` for the file list and commit; `GET
//! /{repo}/resolve/main/{file}` with `Range: bytes=0-0` for the ETag, `X-Repo-Commit` and the size
//! in `Content-Range`, then with `Range: bytes=0-` for the data), and `HF_ENDPOINT` points the
//! binary at it. The download fills the huggingface_hub cache layout, the import equals an import
//! of the same files from a local directory, a second run works offline from the cache, a
//! pickle-only repo is refused before any file is fetched, and 404s / server errors name the
//! file.

mod cli_common;

use assert_cmd::Command;
use cli_common::files;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SHA: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c";

/// One repository the fake Hub serves.
#[derive(Clone, Default)]
struct Repo {
    /// Files with content, served under `resolve/main/`.
    files: BTreeMap<String, Vec<u8>>,
    /// Files listed in the API answer but never served (the test fails if they are fetched).
    listed_only: Vec<String>,
    /// Files answered with this HTTP status instead of their content.
    fail: HashMap<String, u16>,
}

struct Hub {
    repos: HashMap<String, Repo>,
    /// "PATH RANGE" of every request, in order.
    log: Mutex<Vec<String>>,
}

impl Hub {
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn answer(&self, path: &str, range: Option<&str>) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let not_found = |what: &str| {
            let body = json!({ "error": format!("{what} not found") }).to_string().into_bytes();
            (404, vec![("Content-Type".into(), "application/json".into())], body)
        };
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let Some(repo_id) = rest.strip_suffix("/revision/main") else {
                return not_found("revision");
            };
            let Some(repo) = self.repos.get(repo_id) else { return not_found("Repository") };
            let mut names: Vec<&String> = repo.files.keys().chain(&repo.listed_only).collect();
            names.sort();
            let siblings: Vec<Value> = names.iter().map(|n| json!({ "rfilename": n })).collect();
            let body = json!({ "id": repo_id, "sha": SHA, "siblings": siblings });
            return (
                200,
                vec![("Content-Type".into(), "application/json".into())],
                body.to_string().into_bytes(),
            );
        }
        // /{org}/{name}/resolve/main/{file}
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if parts.len() != 5 || parts[2] != "resolve" || parts[3] != "main" {
            return not_found("path");
        }
        let Some(repo) = self.repos.get(&format!("{}/{}", parts[0], parts[1])) else {
            return not_found("Repository");
        };
        let file = parts[4];
        if let Some(&status) = repo.fail.get(file) {
            return (status, vec![], format!("status {status} for {file}").into_bytes());
        }
        let Some(data) = repo.files.get(file) else { return not_found("Entry") };
        let len = data.len();
        // hf-hub always sends `Range: bytes=A-` or `bytes=A-B`.
        let (a, b) = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap_or(len - 1)))
            .unwrap_or((0, len - 1));
        let etag = sha256_hex(data);
        let headers = vec![
            ("ETag".into(), format!("\"{etag}\"")),
            ("X-Repo-Commit".into(), SHA.into()),
            ("Accept-Ranges".into(), "bytes".into()),
            ("Content-Range".into(), format!("bytes {a}-{b}/{len}")),
        ];
        (206, headers, data[a..=b].to_vec())
    }

    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut first = String::new();
        if reader.read_line(&mut first).is_err() {
            return;
        }
        let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut range = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        self.log.lock().unwrap().push(format!("{path} {}", range.as_deref().unwrap_or("-")));
        let (status, headers, body) = self.answer(&path, range.as_deref());
        let reason = match status {
            200 => "OK",
            206 => "Partial Content",
            404 => "Not Found",
            _ => "Error",
        };
        let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
        let mut stream = stream;
        let _ = stream.write_all(out.as_bytes());
        let _ = stream.write_all(&body);
        let _ = stream.flush();
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the fake Hub on an ephemeral port; returns its endpoint URL. The accept loop lives
/// as long as the test process.
fn start(hub: Arc<Hub>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let hub = hub.clone();
            std::thread::spawn(move || hub.serve(stream));
        }
    });
    format!("http://{addr}")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model").join(name)
}

/// The Llama fixture as a two-shard repo with an index and the usual extra files: what an
/// import needs, plus files it must not fetch.
fn sharded_llama() -> Repo {
    let src = fixture("llama");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let half = names.len() / 2;
    let mut files = BTreeMap::new();
    let mut weight_map = BTreeMap::new();
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            part.iter().map(|n| (n.to_string(), st.tensor(n).unwrap())).collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), file.clone());
        }
        files.insert(file, safetensors::serialize(views, None).unwrap());
    }
    let index = json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    files.insert("model.safetensors.index.json".into(), index.to_string().into_bytes());
    files.insert("config.json".into(), std::fs::read(src.join("config.json")).unwrap());
    files.insert("generation_config.json".into(), br#"{"bos_token_id": 1}"#.to_vec());
    files.insert("tokenizer_config.json".into(), br#"{"model_max_length": 64}"#.to_vec());
    files.insert("README.md".into(), b"# tiny llama\n".to_vec());
    Repo {
        files,
        listed_only: vec![".gitattributes".into(), "original/consolidated.00.pth".into()],
        fail: HashMap::new(),
    }
}

/// `mbridge import-hf` with a hermetic Hugging Face environment under `home`.
fn import(endpoint: &str, home: &Path, args: &[&str], offline: bool) -> Command {
    let mut cmd = Command::cargo_bin("mbridge").unwrap();
    cmd.env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home.join("hf"))
        .env("HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .arg("import-hf")
        .args(args)
        .timeout(Duration::from_secs(120));
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd
}

fn stderr_of_failure(mut cmd: Command) -> String {
    let out = cmd.assert().failure();
    String::from_utf8(out.get_output().stderr.clone()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn import_downloads_into_the_hf_cache_and_matches_a_local_import() {
    let repo = sharded_llama();
    let hub = Arc::new(Hub {
        repos: HashMap::from([("tiny-org/llama-sharded".to_string(), repo.clone())]),
        log: Mutex::new(Vec::new()),
    });
    let endpoint = start(hub.clone());
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();

    // The reference: the same files imported from a local directory, to the same output path
    // (the run config names the output), then moved aside.
    let local = home.join("local-src");
    std::fs::create_dir(&local).unwrap();
    for (name, data) in &repo.files {
        std::fs::write(local.join(name), data).unwrap();
    }
    let out = home.join("out");
    Command::cargo_bin("mbridge")
        .unwrap()
        .args(["import-hf", s(&local), s(&out)])
        .assert()
        .success();
    let reference = home.join("out-local");
    std::fs::rename(&out, &reference).unwrap();

    import(&endpoint, home, &["tiny-org/llama-sharded", s(&out)], false).assert().success();

    // huggingface_hub's cache layout under $HF_HOME/hub, with refs/main naming the commit.
    let base = home.join("hf/hub/models--tiny-org--llama-sharded");
    assert_eq!(std::fs::read_to_string(base.join("refs/main")).unwrap(), SHA);
    let snap = base.join("snapshots").join(SHA);
    let fetched = [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer_config.json",
        "generation_config.json",
    ];
    for f in fetched {
        assert_eq!(std::fs::read(snap.join(f)).unwrap(), repo.files[f], "cached {f}");
    }
    assert!(!snap.join("README.md").exists(), "README.md is not needed and not fetched");
    let requests = hub.requests();
    assert_eq!(requests[0], "/api/models/tiny-org/llama-sharded/revision/main -");
    for f in fetched {
        let url = format!("/tiny-org/llama-sharded/resolve/main/{f}");
        assert!(requests.contains(&format!("{url} bytes=0-0")), "{f}: metadata: {requests:?}");
        assert!(requests.contains(&format!("{url} bytes=0-")), "{f}: data: {requests:?}");
    }
    assert_eq!(requests.len(), 1 + 2 * fetched.len(), "{requests:?}");

    // Byte for byte the local import, except where the source is recorded.
    let (mut got, mut want) = (files(&out), files(&reference));
    let source = "iter_0000000/hf_source.json";
    let (got_src, want_src) = (got.remove(source).unwrap(), want.remove(source).unwrap());
    // The run config names the model by repo id instead of the local path.
    let config = "iter_0000000/run_config.toml";
    let local_id = format!("hf_model_id = \"{}\"", local.display());
    let want_config = String::from_utf8(want[config].clone()).unwrap();
    assert!(want_config.contains(&local_id), "{want_config}");
    let want_config = want_config.replace(&local_id, "hf_model_id = \"tiny-org/llama-sharded\"");
    want.insert(config.into(), want_config.into_bytes());
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (name, data) in &want {
        if got[name] != *data {
            let (g, w) = (String::from_utf8_lossy(&got[name]), String::from_utf8_lossy(data));
            let lines: Vec<_> = g.lines().zip(w.lines()).filter(|(a, b)| a != b).take(5).collect();
            panic!("{name} differs from the local import (downloaded, local): {lines:?}");
        }
    }
    let got_src: Value = serde_json::from_slice(&got_src).unwrap();
    let mut want_src: Value = serde_json::from_slice(&want_src).unwrap();
    assert_eq!(got_src["repo_id"], "tiny-org/llama-sharded");
    assert_eq!(got_src["revision"], SHA);
    assert_eq!(got_src["source_dir"], json!(snap.canonicalize().unwrap().to_str().unwrap()));
    for key in ["repo_id", "revision", "source_dir"] {
        want_src[key] = got_src[key].clone();
    }
    assert_eq!(got_src, want_src);

    // Offline, the same repo id is served from the cache without a single request.
    let out2 = home.join("out2");
    import(&endpoint, home, &["tiny-org/llama-sharded", s(&out2)], true).assert().success();
    assert_eq!(hub.requests().len(), requests.len(), "offline run made requests");
    let again: Value = serde_json::from_slice(&std::fs::read(out2.join(source)).unwrap()).unwrap();
    assert_eq!(
        (&again["repo_id"], &again["revision"]),
        (&got_src["repo_id"], &got_src["revision"])
    );
    // Online, a fully cached repo is not fetched again either.
    let out3 = home.join("out3");
    import(&endpoint, home, &["tiny-org/llama-sharded", s(&out3)], false).assert().success();
    assert_eq!(hub.requests().len(), requests.len(), "a cached repo was fetched again");
}

#[test]
fn pickle_only_repos_are_refused_before_any_download_and_http_errors_name_the_file() {
    let llama = sharded_llama();
    let config = llama.files["config.json"].clone();
    let pickle = Repo {
        files: BTreeMap::from([
            ("config.json".to_string(), config),
            ("pytorch_model.bin".to_string(), b"not really a pickle".to_vec()),
        ]),
        ..Default::default()
    };
    let mut missing = llama.clone();
    missing.fail.insert("model-00002-of-00002.safetensors".into(), 404);
    let mut broken = llama.clone();
    broken.fail.insert("model-00001-of-00002.safetensors".into(), 500);
    let hub = Arc::new(Hub {
        repos: HashMap::from([
            ("tiny-org/pickle-only".to_string(), pickle),
            ("tiny-org/missing-shard".to_string(), missing),
            ("tiny-org/server-error".to_string(), broken),
        ]),
        log: Mutex::new(Vec::new()),
    });
    let endpoint = start(hub.clone());
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let out = home.join("out");

    let err = stderr_of_failure(import(&endpoint, home, &["tiny-org/pickle-only", s(&out)], false));
    assert!(err.contains("pickle"), "{err}");
    assert!(err.contains("safetensors only"), "{err}");
    let requests = hub.requests();
    assert_eq!(requests, vec!["/api/models/tiny-org/pickle-only/revision/main -"]);
    assert!(!home.join("hf/hub/models--tiny-org--pickle-only/blobs").exists());

    let err = stderr_of_failure(import(&endpoint, home, &["tiny-org/nope", s(&out)], false));
    assert!(err.contains("cannot list the files of `tiny-org/nope`"), "{err}");
    assert!(err.contains("404"), "{err}");

    let err =
        stderr_of_failure(import(&endpoint, home, &["tiny-org/missing-shard", s(&out)], false));
    assert!(
        err.contains(
            "cannot download `model-00002-of-00002.safetensors` of `tiny-org/missing-shard`"
        ),
        "{err}"
    );
    assert!(err.contains("404"), "{err}");
    let err =
        stderr_of_failure(import(&endpoint, home, &["tiny-org/server-error", s(&out)], false));
    assert!(
        err.contains(
            "cannot download `model-00001-of-00002.safetensors` of `tiny-org/server-error`"
        ),
        "{err}"
    );
    assert!(err.contains("500"), "{err}");
    assert!(!out.exists(), "a failed download left an output directory");

    // The half-filled cache is not taken for complete: offline, the missing shard is named.
    let err =
        stderr_of_failure(import(&endpoint, home, &["tiny-org/missing-shard", s(&out)], true));
    assert!(err.contains("model-00002-of-00002.safetensors missing from"), "{err}");
}
