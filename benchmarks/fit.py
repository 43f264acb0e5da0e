"""Factor-fitting time as a ratio to plain training steps over the same data, in the same run.

    python benchmarks/fit.py [--hidden 256] [--layers 4] [--heads 8] [--seq 128] [--examples 64] [--batch 8]

Baseline: one forward + backward with parameter gradients per batch (what a training step costs
without the optimizer), over the same batches. The EK-FAC fit makes two such passes (covariance, then
eigenvalue correction) with activation-only backwards, plus the eigendecompositions, so its floor is
about 2.0×. Prints one line per strategy with the ratio; the wall-clock seconds are printed for context
only.
"""

from __future__ import annotations

import argparse
import time

import msif  # noqa: F401  (first: sets passive OpenMP waiting before torch loads)
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif.curvature.fit import FitConfig, fit_factors
from msif.data.encoding import Encoded, collate
from msif.objectives import data_targets, model_logits, summed_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=args.hidden, num_attention_heads=args.heads, num_hidden_layers=args.layers,
                        intermediate_size=4 * args.hidden, vocab_size=args.vocab, max_position_embeddings=args.seq)
    model = GPTNeoXForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    exs = [Encoded(torch.randint(0, args.vocab, (args.seq,), generator=g).tolist(), [True] * (args.seq - 1) + [False], index=i)
           for i in range(args.examples)]
    data = [collate(exs[i : i + args.batch]) for i in range(0, len(exs), args.batch)]
    n_params = sum(p.numel() for p in model.parameters())

    def train_pass():
        for b in data:
            model.zero_grad(set_to_none=True)
            loss = summed_loss(model_logits(model, b), data_targets(b, "lm")).sum()
            loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(fn):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    train_pass()  # warm-up
    base = timed(train_pass)
    print(f"model: GPT-NeoX {args.layers} layers, hidden {args.hidden}, {n_params/1e6:.1f}M params; "
          f"{args.examples} sequences × {args.seq} tokens, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"baseline: training pass (forward + backward with parameter gradients): {base:.2f} s")
    for strategy in ("ekfac", "kfac", "diagonal"):
        fs_holder = {}

        def run():
            fs_holder["fs"] = fit_factors(model, data, FitConfig(strategy=strategy), fingerprint="bench")

        t = timed(run)
        tim = fs_holder["fs"].meta["timings"]
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in tim.items())
        passes = t - tim.get("eigendecomposition_s", 0.0)
        print(f"{strategy:9s} fit: {t:.2f} s  ratio to training pass: {t / base:.2f}x; data passes only "
              f"(without the one-off float64 eigendecomposition): {passes / base:.2f}x  ({parts})")


if __name__ == "__main__":
    main()
