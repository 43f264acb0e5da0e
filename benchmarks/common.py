"""What the benchmarks share: a random-weight GPT-NeoX, random token data, the training-pass baseline
and a best-of-N timer."""

from __future__ import annotations

import argparse
import time

import msif  # noqa: F401  (first: sets passive OpenMP waiting before torch loads)
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif.data.encoding import Encoded, collate
from msif.objectives import data_targets, model_logits, summed_loss


def model_arguments(ap: argparse.ArgumentParser, n_name: str = "--examples") -> None:
    """Model and data size options shared by the benchmarks."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(n_name, type=int, default=64, dest="n")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def model_and_data(args):
    """(model, batches of random full-length sequences, generator) for the parsed ``args``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=args.hidden, num_attention_heads=args.heads, num_hidden_layers=args.layers,
                        intermediate_size=4 * args.hidden, vocab_size=args.vocab, max_position_embeddings=args.seq)
    model = GPTNeoXForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    exs = [Encoded(torch.randint(0, args.vocab, (args.seq,), generator=g).tolist(), [True] * (args.seq - 1) + [False], index=i)
           for i in range(args.n)]
    return model, [collate(exs[i : i + args.batch]) for i in range(0, len(exs), args.batch)], g


def describe(model, args, what: str) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    return (f"model: GPT-NeoX {args.layers} layers, hidden {args.hidden}, {n_params/1e6:.1f}M params; "
            f"{args.n} {what} × {args.seq} tokens, batch {args.batch}, {torch.get_num_threads()} threads")


def train_pass(model, data, objective: str = "lm") -> None:
    """The baseline: forward + backward with parameter gradients (a training step without the optimizer)."""
    for b in data:
        model.zero_grad(set_to_none=True)
        summed_loss(model_logits(model, b), data_targets(b, objective)).sum().backward()
    model.zero_grad(set_to_none=True)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` wall-clock runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
