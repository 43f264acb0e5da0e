"""What `--refine-query K` costs per query, as multiples of a plain training step over the GGN sample.

    python benchmarks/refine.py [--hidden 256] [--layers 4] [--examples 64] [--queries 16] [--steps 1 2 5]

Baseline: forward + backward with parameter gradients over the ``--examples`` sequences of the GGN
sample (``common.train_pass``), measured in the same run. Measured:

* one GGN-vector product for ``Q`` vectors at once (:class:`msif.curvature.gvp.GGNOperator`), per
  vector, and the same for one vector alone (how much batching the columns saves);
* ``K`` refinement steps of one stage (:func:`msif.curvature.refine.pcg`, EK-FAC preconditioner and
  start) for ``Q`` query gradients: products used, seconds per query, as training steps per query;
* the memory the refinement holds per query (six copies of the tracked weights in float32) beside
  the model's weights.

Ratios, not seconds, are what carries over between machines.
"""

from __future__ import annotations

import argparse

import torch
from common import describe, model_and_data, model_arguments, timed, train_pass

from msif.curvature.fit import FitConfig, fit_factors
from msif.curvature.hooks import per_example_grads
from msif.curvature.gvp import GGNOperator
from msif.curvature.precondition import chain
from msif.curvature.refine import pcg
from msif.influence.stream import format_bytes
from msif.models.adapters import tracked_modules


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="*", default=[1, 2, 5])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, data, g = model_and_data(args)
    tms = tracked_modules(model)
    fs = fit_factors(model, data, FitConfig(strategy="ekfac"), progress=False)
    lam = fs.resolve_damping("0.1x")
    op = GGNOperator(model, tms, data, "lm")
    base = timed(lambda: train_pass(model, data), args.repeats)
    print(describe(model, args, "GGN-sample sequences"))
    print(f"baseline training step over the sample: {base:.3f} s")
    Q = args.queries
    qb = data[0]
    grads = {}
    for i in range(0, Q, qb.size):
        for n, x in per_example_grads(model, tms, data[(i // qb.size) % len(data)], "lm").items():
            grads.setdefault(n, []).append(x)
    b = {n: torch.cat(v)[:Q] for n, v in grads.items()}
    t_one = timed(lambda: op({n: v[:1] for n, v in b.items()}), args.repeats)
    t_all = timed(lambda: op(b), args.repeats)
    print(f"one GGN-vector product: {t_one / base:.2f} training steps for 1 vector; {t_all / Q / base:.2f} per vector "
          f"for {Q} at once ({op.columns} per vectorised pass)")
    P = lambda V: chain([(fs, lam)], V, torch.float32)  # noqa: E731
    D = sum(tm.out_features * tm.in_dim for tm in tms)
    print(f"memory while refining: 6 × {D / 1e6:.1f}M tracked weights × 4 B = {format_bytes(24 * D)} per query "
          f"(model weights: {format_bytes(sum(p.numel() * p.element_size() for p in model.parameters()))})")
    print("| K (CG steps) | products / query | seconds / query | training steps / query | relative residual (max over queries) |")
    print("|---|---|---|---|---|")
    for K in args.steps:
        out = {}
        t = timed(lambda: out.__setitem__("r", pcg(op, lam, b, P, K)), 1)
        r = out["r"]
        print(f"| {K} | {r.products / Q:.0f} | {t / Q:.3f} | {t / Q / base:.2f} | {float(r.residuals[0].max()):.3f} → "
              f"{float(r.residuals[-1].max()):.3f} |")


if __name__ == "__main__":
    main()
