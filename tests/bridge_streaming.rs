//! import-hf / export-hf stream from mapped files: a sharded ~420 MB model converts with a
//! peak RSS well below its size, and the round trip is byte-identical. (One test in this
//! file: RUSAGE_CHILDREN's peak covers every child of the test process.)

use assert_cmd::Command;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Writes a random bf16 Llama-shaped model as two safetensors shards with an index.
fn write_model(dir: &Path) -> u64 {
    let (h, ffn, heads, kv, vocab, layers) =
        (1024usize, 4096usize, 16usize, 4usize, 32000usize, 10);
    let d = h / heads;
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![h]));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![heads * d, h]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * d, h]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * d, h]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![h, heads * d]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![ffn, h]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![h, ffn]));
    }
    tensors.push(("model.norm.weight".to_string(), vec![h]));
    tensors.push(("lm_head.weight".to_string(), vec![vocab, h]));
    let half = tensors.len() / 2;
    let mut weight_map = BTreeMap::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut total = 0u64;
    for (i, part) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for (name, shape) in part.iter() {
            let len = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len]}),
            );
            weight_map.insert(name.clone(), file.clone());
            off += len;
        }
        let mut head = serde_json::to_vec(&header).unwrap();
        while !head.len().is_multiple_of(8) {
            head.push(b' ');
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(&file)).unwrap());
        f.write_all(&(head.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&head).unwrap();
        // Generated a chunk at a time: the peak RSS measured below covers this process too
        // when a child is forked, so it must stay small.
        let mut buf = vec![0u8; 1 << 20];
        let mut left = off;
        while left > 0 {
            let k = left.min(buf.len());
            for c in buf[..k].chunks_exact_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let v = (rng & 0x807F_807F_807F_807F) | 0x3C80_3C80_3C80_3C80;
                c.copy_from_slice(&v.to_le_bytes());
            }
            f.write_all(&buf[..k]).unwrap();
            left -= k;
        }
        total += off as u64;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    total
}

/// Every tensor of an HF directory: name → (dtype, shape, bytes).
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, v) in st.tensors() {
                out.insert(
                    name,
                    (format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec()),
                );
            }
        }
    }
    out
}

fn children_max_rss_bytes() -> u64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    u.max_rss() as u64 * 1024 // KiB on Linux
}

#[test]
fn sharded_import_and_export_stream_with_bounded_memory_and_round_trip_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, ck, hf) = (tmp.path().join("src"), tmp.path().join("ck"), tmp.path().join("hf"));
    std::fs::create_dir(&src).unwrap();
    let model_bytes = write_model(&src);
    assert!(model_bytes > 400_000_000, "{model_bytes}");
    let run = |args: &[&str]| {
        Command::cargo_bin("mbridge").unwrap().args(args).assert().success();
    };
    run(&["import-hf", src.to_str().unwrap(), ck.to_str().unwrap(), "--tp", "2"]);
    let import_rss = children_max_rss_bytes();
    run(&["export-hf", ck.to_str().unwrap(), hf.to_str().unwrap(), "--max-shard-size-gb", "0.2"]);
    let peak = children_max_rss_bytes();
    // The largest tensor (embedding, lm_head) is 65 MB; a converter that held the model would
    // need more than its 420 MB.
    assert!(
        import_rss < model_bytes / 3,
        "import peak RSS {import_rss} for a {model_bytes}-byte model"
    );
    assert!(peak < model_bytes / 3, "export peak RSS {peak} for a {model_bytes}-byte model");
    assert!(hf.join("model.safetensors.index.json").is_file());
    let (a, b) = (tensors(&src), tensors(&hf));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(b.get(name) == Some(t), "{name} differs after import --tp 2 → export");
    }
}
