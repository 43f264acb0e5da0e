"""MS-IF candidate throughput as a ratio to plain training steps on θ_pt over the same candidates.

    python benchmarks/score.py [--hidden 256] [--layers 4] [--seq 128] [--candidates 64] [--batch 8]

Baseline: forward + backward with parameter gradients (a training step without the optimizer) over
the candidates, measured in the same run. Scoring: the streamed MS-IF pass (forward + activation-only
backward with hooks + contraction with the query vectors U = P_pt P_ft ∇m), for 1 and 16 queries
sharing one pass, and with rank-r query vectors. The query vectors are real: gradients of 4-token
answers after 20-token prompts, preconditioned twice (U = P P ∇m, as for MS-IF with one model). Prints throughput ratios (baseline time / scoring
time: 1.0 means as fast as training), and the low-rank scores' Spearman against the full ones.
"""

from __future__ import annotations

import argparse

import torch
from common import describe, model_and_data, model_arguments, timed, train_pass
from scipy.stats import spearmanr

from msif.curvature.fit import FitConfig, fit_factors, per_example_grads
from msif.data.encoding import Encoded, collate
from msif.influence.scoring import low_rank, score_batches
from msif.models.adapters import tracked_modules


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, "--candidates")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 32])
    args = ap.parse_args()
    model, data, g = model_and_data(args)
    tms = tracked_modules(model)
    fs = fit_factors(model, data[:2], FitConfig(strategy="ekfac"), fingerprint="bench")
    base = timed(lambda: train_pass(model, data), args.repeats)
    print(describe(model, args, "candidates"))
    print(f"baseline training pass: {base:.3f} s ({args.n / base:.1f} candidates/s)")
    for Q in (1, 16):
        # real query gradients: prompts of 20 tokens with 4-token answers (m = −log p(answer | prompt))
        qs = [Encoded(torch.randint(0, args.vocab, (24,), generator=g).tolist(), [False] * 19 + [True] * 4 + [False], index=i)
              for i in range(Q)]
        grads = per_example_grads(model, tms, collate(qs), "answer")
        U = {n: x.float() for n, x in fs.precondition(fs.precondition(grads, "0.1x"), "0.1x").items()}
        full = {}

        def run():
            full["r"] = score_batches(model, tms, U, data)

        t = timed(run, args.repeats)
        print(f"MS-IF, {Q:2d} quer{'y' if Q == 1 else 'ies'} sharing a pass: {t:.3f} s, throughput ratio {base / t:.2f} "
              f"({args.n * Q / t:.1f} query-candidate pairs/s)")
        for r in args.ranks:
            lr = low_rank(U, tms, r)
            out = {}

            def run_lr():
                out["r"] = score_batches(model, tms, lr, data)

            t = timed(run_lr, args.repeats)
            rho = [spearmanr(out["r"].scores[q], full["r"].scores[q])[0] for q in range(Q)]
            print(f"   rank-{r:<3d} query vectors: {t:.3f} s, throughput ratio {base / t:.2f}, Spearman vs full {sum(rho)/len(rho):.3f}")


if __name__ == "__main__":
    main()
