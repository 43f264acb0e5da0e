"""The scalability study of the paper (§5.1, Table 1 / Figure 1) with size overrides.

    python benchmarks/scalability.py [--quick] [--out runs/scalability] [--hidden 16] [--curvature 256]
                                     [--queries 10] [--candidates 500] [--dampings 0.01,0.1,1] [--lds]

Same study as ``msif bench scalability`` (see :mod:`msif.eval.scalability` for what is measured and
how); this script also lets the sizes be changed, e.g. to look at how the numbers move with the
model's hidden size or the size of the curvature set. Writes results.json, table.md,
spearman_vs_time.png and training_curve.png into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from msif.eval import scalability as sc
from msif.eval import scalability_report as report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/scalability")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--curvature", type=int, help="sentences G is computed on")
    ap.add_argument("--queries", type=int)
    ap.add_argument("--candidates", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--replicates", type=int)
    ap.add_argument("--dampings", help="comma-separated multiples of the mean GGN eigenvalue")
    ap.add_argument("--lds", action="store_true", help="also the linear datamodeling score")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = sc.QUICK if a.quick else sc.ScalabilityConfig()
    over = {}
    if a.hidden:
        over.update(hidden=a.hidden, intermediate=4 * a.hidden)
    for k, v in (("n_curvature", a.curvature), ("n_queries", a.queries), ("n_candidates", a.candidates),
                 ("epochs", a.epochs), ("replicates", a.replicates)):
        if v is not None:
            over[k] = v
    if a.dampings:
        over["dampings"] = tuple(float(x) for x in a.dampings.split(","))
    cfg = replace(cfg, **over)
    t0 = time.perf_counter()
    res = sc.run(cfg, progress=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
    if a.lds:
        from msif.eval import lds

        res["lds"] = lds.run(lds.LDSConfig(), progress=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
    paths = report.write_outputs(res, a.out)
    print(report.markdown_table(res))
    if a.lds:
        print()
        print(open(paths["lds_table"]).read())
    print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
