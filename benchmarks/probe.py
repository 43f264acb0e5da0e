"""Pythia-shaped probes for the scale benchmarks: a random-init GPT-NeoX checkpoint saved to a folder,
a word-level tokenizer with a 50k vocabulary, and JSONL corpora of ~190-token documents.

    python benchmarks/probe.py --shape 70m --out /tmp/probe70m --documents 2000

writes ``OUT/model`` (checkpoint + tokenizer), ``OUT/corpus.jsonl`` (``id``, ``text``) and
``OUT/sft.jsonl`` (``prompt``, ``answer``). Everything is built here from a config (no downloads);
the shapes are those of the public Pythia configs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

#: hidden, layers, heads, intermediate of the Pythia family (vocab 50,304, context 2,048)
SHAPES = {
    "14m": (128, 6, 4, 512),
    "70m": (512, 6, 8, 2048),
    "160m": (768, 12, 12, 3072),
    "410m": (1024, 24, 16, 4096),
    "1b": (2048, 16, 8, 8192),
}
VOCAB = 50304


def neox_config(shape: str, vocab: int = VOCAB, context: int = 2048):
    from transformers import GPTNeoXConfig

    h, L, nh, f = SHAPES[shape]
    return GPTNeoXConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, intermediate_size=f,
                         vocab_size=vocab, max_position_embeddings=context, rotary_pct=0.25,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def word_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over ``vocab`` synthetic words ``w0 … w{vocab-5}`` (+ 4 specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for i in range(vocab - 4):
        words[f"w{i}"] = i + 4
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def write_corpus(path: Path, n: int, mean_tokens: int = 190, vocab: int = VOCAB, seed: int = 0) -> Path:
    """``n`` documents of ``mean_tokens ± 20%`` Zipf-distributed words, with ids ``doc-000000`` …"""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) for r in range(vocab - 4)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            L = rng.randint(int(mean_tokens * 0.8), int(mean_tokens * 1.2))
            words = rng.choices(range(vocab - 4), weights=weights, k=L)
            f.write(json.dumps({"id": f"doc-{i:06d}", "text": " ".join(f"w{w}" for w in words)}) + "\n")
    tmp.rename(path)
    return path


def write_sft(path: Path, n: int, vocab: int = VOCAB, seed: int = 1) -> Path:
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(n):
            p = " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(rng.randint(12, 30)))
            a = " " + " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(rng.randint(2, 8)))
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    tmp.rename(path)
    return path


def build(shape: str, out: Path, documents: int = 200, sft: int = 64, seed: int = 0) -> Path:
    """The probe folder (model checkpoint + tokenizer, corpus, sft data); reused when already there."""
    import torch
    from transformers import GPTNeoXForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(neox_config(shape))
        tmp = out / "model.tmp"
        model.save_pretrained(tmp)
        word_tokenizer().save_pretrained(tmp)
        tmp.rename(model_dir)
    corpus = out / f"corpus-{documents}.jsonl"
    if not corpus.exists():
        write_corpus(corpus, documents, seed=seed)
    data = out / f"sft-{sft}.jsonl"
    if not data.exists():
        write_sft(data, sft)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="70m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--documents", type=int, default=200)
    ap.add_argument("--sft", type=int, default=64)
    a = ap.parse_args()
    print(build(a.shape, a.out, a.documents, a.sft))


if __name__ == "__main__":
    main()
