#!/usr/bin/env python3
"""Benchmark input for scripts/bench/preprocess.sh: a JSONL corpus of English-like text and a
32k byte-level BPE tokenizer (HF directory that transformers' AutoTokenizer loads).

Deterministic (seeded); nothing is downloaded. Usage: preprocess_corpus.py OUT_DIR MEGABYTES
"""
import json
import os
import random
import sys

from tokenizers import ByteLevelBPETokenizer

out, megabytes = sys.argv[1], float(sys.argv[2])
os.makedirs(out, exist_ok=True)
rng = random.Random(1234)
syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ["a", "e", "i", "o", "u", "ai", "ou", "er"]]
# A Zipf-distributed vocabulary of pseudo-words gives realistic BPE merge statistics.
words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(40000)]
weights = [1.0 / (i + 1) for i in range(len(words))]
punct = [".", ",", ";", "!", "?", ":"]


def sentence():
    n = rng.randint(4, 25)
    ws = rng.choices(words, weights, k=n)
    ws[0] = ws[0].capitalize()
    if rng.random() < 0.2:
        ws.insert(rng.randint(0, n), str(rng.randint(0, 99999)))
    return " ".join(ws) + rng.choice(punct)


target = int(megabytes * 1e6)
written = 0
sample = []
with open(os.path.join(out, "corpus.jsonl"), "w") as f:
    doc_id = 0
    while written < target:
        paras = ["".join(sentence() + " " for _ in range(rng.randint(2, 12))).strip()
                 for _ in range(rng.randint(1, 6))]
        text = "\n\n".join(paras)
        line = json.dumps({"id": doc_id, "text": text}) + "\n"
        f.write(line)
        written += len(line.encode())
        if len(sample) < 3000:
            sample.append(text)
        doc_id += 1
tok = ByteLevelBPETokenizer()
tok.train_from_iterator(sample, vocab_size=32000, min_frequency=2, special_tokens=["<|endoftext|>"])
tokdir = os.path.join(out, "tokenizer")
os.makedirs(tokdir, exist_ok=True)
tok.save(os.path.join(tokdir, "tokenizer.json"))
with open(os.path.join(tokdir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
               "bos_token": "<|endoftext|>", "model_max_length": 1 << 30}, f)
print(f"{doc_id} documents, {written / 1e6:.1f} MB, tokenizer vocab {tok.get_vocab_size()}")
