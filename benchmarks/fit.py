"""Factor-fitting time as a ratio to plain training steps over the same data, in the same run.

    python benchmarks/fit.py [--hidden 256] [--layers 4] [--heads 8] [--seq 128] [--examples 64] [--batch 8]

Baseline: one forward + backward with parameter gradients per batch (what a training step costs
without the optimizer), over the same batches. The EK-FAC fit makes two passes (covariance, then
eigenvalue correction) with activation-only backwards, plus the statistics' own products (``a aᵀ``,
``s sᵀ``, the eigenbasis rotations: as many FLOPs as the tracked layers' training step, at any width)
and the float64 eigendecompositions. Each line also prints the FLOP ratio ``msif plan`` counts for
the strategy, the floor at equal throughput. ``ekfac+r1`` adds one basis-refinement pass
(``--refine-basis 1``). Prints one line per strategy with the ratio; the wall-clock seconds are
printed for context only.
"""

from __future__ import annotations

import argparse

from common import describe, model_and_data, model_arguments, timed, train_pass

from msif.curvature.fit import FitConfig, fit_factors
from msif.plan import PlanSettings, fit_flops, model_shape, train_flops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, "--examples")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, data, _ = model_and_data(args)
    base = timed(lambda: train_pass(model, data), args.repeats)
    print(describe(model, args, "sequences"))
    print(f"baseline: training pass (forward + backward with parameter gradients): {base:.2f} s")
    shape = model_shape(model)
    train_fl = len(data) * args.batch * train_flops(shape, args.seq)
    for label, strategy, refine in (("ekfac", "ekfac", 0), ("ekfac+r1", "ekfac", 1), ("kfac", "kfac", 0), ("diagonal", "diagonal", 0)):
        fs_holder = {}

        def run():
            fs_holder["fs"] = fit_factors(model, data, FitConfig(strategy=strategy, refine=refine), fingerprint="bench")

        t = timed(run, args.repeats)
        tim = fs_holder["fs"].meta["timings"]
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in tim.items())
        passes = t - tim.get("eigendecomposition_s", 0.0)
        fl = fit_flops(shape, PlanSettings(model="", strategy=strategy, refine=refine), len(data) * args.batch, args.seq)
        print(f"{label:9s} fit: {t:.2f} s  ratio to training pass: {t / base:.2f}x (FLOP ratio {fl['flops'] / train_fl:.2f}x); "
              f"data passes only (without the one-off float64 eigendecomposition): {passes / base:.2f}x "
              f"(FLOPs {(fl['flops'] - fl['eig_flops']) / train_fl:.2f}x)  ({parts})")


if __name__ == "__main__":
    main()
