"""How close EK-FAC gets to the exact block-diagonal GGN (its ceiling) as the width and training change.

    python benchmarks/kronecker_gap.py [--hidden 16 32] [--epochs 80] [--countries 40]

For each hidden size (intermediate 4×), the scalability study's model is trained on the world-facts
sentences, then analysed like one checkpoint of ``msif bench scalability``
(:func:`msif.eval.scalability.analyse_checkpoint`): ground truth CG on the exact GGN with batched
matrix-free GGN-vector products (relative residual 1e-6), the exact diagonal blocks (no dense ``G``),
and Spearman (mean over 10 queries × 500 candidates) of the ceiling, the best single-Kronecker basis
with the exact Λ, EK-FAC with a refined basis, EK-FAC and GDP. Prints the ratios ``EK-FAC / ceiling``
and ``refined / ceiling`` and the share of each block off the diagonal of each basis; the seconds are
for context only.
"""

from __future__ import annotations

import argparse
import time

import msif  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import torch

from msif.curvature import exact
from msif.eval import scalability as sc
from msif.eval import tinylm
from msif.models.adapters import tracked_modules


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--countries", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for h in args.hidden:
        t0 = time.perf_counter()
        cfg = sc.ScalabilityConfig(hidden=h, intermediate=4 * h, epochs=args.epochs, countries=args.countries)
        data = tinylm.make_data(cfg.countries, cfg.min_count, cfg.heldout_fraction, cfg.seed)
        q, c, g = sc.study_sets(data, cfg)
        model = tinylm.build_model(len(data.vocab), h, cfg.layers, cfg.heads, cfg.intermediate, cfg.seed)
        curve = tinylm.train_lm(model, data.train, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, data.heldout)
        row = sc.analyse_checkpoint(model.double().eval(), [data.heldout[i] for i in q], [data.train[i] for i in c],
                                    [data.train[i] for i in g], cfg)
        D = exact.param_layout(tracked_modules(model)).D
        od = row["offdiagonal_mass"]
        print(f"hidden {h}: D = {D}, train loss {curve['train_loss'][-1]:.3f}, held-out {curve['heldout_loss'][-1]:.3f}; "
              f"off-diagonal share EK-FAC {od['ekfac']:.3f}, refined {od['ekfac_refined']:.3f}, best Kronecker {od['best']:.3f}")
        for k, v in row["spearman"].items():
            print(f"  damping {k}: ceiling {v['exact_block']:.3f}, best Kronecker basis {v['kron_best']:.3f}, "
                  f"EK-FAC refined {v['ekfac_refined']:.3f}, EK-FAC {v['ekfac']:.3f}, GDP {v['gdp']:.3f}; "
                  f"EK-FAC / ceiling {v['ekfac'] / v['exact_block']:.2f}, refined / ceiling {v['ekfac_refined'] / v['exact_block']:.2f} "
                  f"(CG {row['cg'][k]['iterations']} iterations, converged {row['cg'][k]['converged']})")
        print(f"  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
