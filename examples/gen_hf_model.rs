//! Writes a random Llama-shaped HF model directory (config.json + sharded bf16 safetensors
//! with an index, as `save_pretrained` lays it out) for the bridge benchmark. Values are
//! finite bf16 noise from a xorshift generator (fast: the benchmark measures conversion, not
//! generation).
//!
//! ```text
//! cargo run --release --example gen_hf_model -- <out dir> <1b|3b|8b> [max shard GB (5)]
//! ```

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

struct Shape {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
    tied: bool,
}

fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        // Llama-3.2-1B, Llama-3.2-3B, Llama-3-8B.
        "1b" => Shape {
            layers: 16,
            hidden: 2048,
            ffn: 8192,
            heads: 32,
            kv: 8,
            vocab: 128256,
            tied: true,
        },
        "3b" => Shape {
            layers: 28,
            hidden: 3072,
            ffn: 8192,
            heads: 24,
            kv: 8,
            vocab: 128256,
            tied: true,
        },
        "8b" => Shape {
            layers: 32,
            hidden: 4096,
            ffn: 14336,
            heads: 32,
            kv: 8,
            vocab: 128256,
            tied: false,
        },
        other => bail!("unknown size `{other}` (1b, 3b, 8b)"),
    })
}

fn tensors(s: &Shape) -> Vec<(String, Vec<usize>)> {
    let (h, d) = (s.hidden, s.hidden / s.heads);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![s.vocab, h])];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h]));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![s.heads * d, h]));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![s.kv * d, h]));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![s.kv * d, h]));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, s.heads * d]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![s.ffn, h]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![s.ffn, h]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![h, s.ffn]));
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    if !s.tied {
        t.push(("lm_head.weight".to_string(), vec![s.vocab, h]));
    }
    t
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out =
        PathBuf::from(args.get(1).context("usage: gen_hf_model <out> <1b|3b|8b> [shard GB]")?);
    let s = shape(args.get(2).map(String::as_str).unwrap_or("1b"))?;
    let max_shard =
        (args.get(3).map(|a| a.parse::<f64>()).transpose()?.unwrap_or(5.0) * 1e9) as usize;
    std::fs::create_dir_all(&out)?;
    let all = tensors(&s);
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0;
    for t in all {
        let bytes = t.1.iter().product::<usize>() * 2;
        if size + bytes > max_shard && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push(t);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 8 << 20];
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0;
        for (name, shape) in shard {
            let len = shape.iter().product::<usize>() * 2;
            header.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len]}));
            weight_map.insert(name.clone(), file.clone());
            off += len;
        }
        total += off;
        let mut head = serde_json::to_vec(&header)?;
        while !head.len().is_multiple_of(8) {
            head.push(b' ');
        }
        let mut f =
            std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(out.join(&file))?);
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        let mut left = off;
        while left > 0 {
            let k = left.min(buf.len());
            for c in buf[..k].chunks_exact_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // Four bf16 lanes: random sign and mantissa, exponents near 2^-6 (finite).
                let v = (rng & 0x807F_807F_807F_807F) | 0x3C80_3C80_3C80_3C80;
                c.copy_from_slice(&v.to_le_bytes());
            }
            f.write_all(&buf[..k])?;
            left -= k;
        }
        f.flush()?;
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            out.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv,
        "head_dim": s.hidden / s.heads,
        "vocab_size": s.vocab,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": s.tied,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "bfloat16",
        "bos_token_id": 128000,
        "eos_token_id": 128001
    });
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    println!("wrote {} ({} bytes of weights in {n} files)", out.display(), total);
    Ok(())
}
