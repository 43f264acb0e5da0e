"""What a user waits for in MS-IF attribution, as ratios to plain training steps over the same candidates.

    python benchmarks/score.py [--hidden 256] [--layers 4] [--seq 128] [--candidates 64] [--batch 8]

Baseline: forward + backward with parameter gradients (a training step without the optimizer) over
the candidates, measured in the same run. Two EK-FAC factor sets are fitted (on different halves of
the data, standing in for θ_pt's and θ_ft's) so that MS-IF's two preconditionings have different
eigenbases. For Q = 1, 16, 64 queries (4-token answers after 20-token prompts, m = −log p(answer |
prompt)) it times:

* query vectors ``U = P_pt P_ft ∇m`` as ``msif attribute`` makes them: factored per-example gradients
  and one :func:`msif.curvature.precondition.chain` over both stages; beside it the route before it
  (dense gradients, two separate preconditionings each returning to the parameter basis);
* the streamed candidate pass alone (forward + activation-only backward with hooks + contraction with
  ``U``), and end to end (query vectors + pass);
* the multiply-adds the exact query vectors cannot avoid (first rotation, one change of basis, one
  rotation back per module) against those of the training pass (3 × the tracked linears' and the
  head's forward multiply-adds per token). This is the query-vector / pass ratio that equal
  arithmetic efficiency would give; measured times can sit below it because the query vectors are a
  few large matmuls while the pass also pays attention, norms and hooks.

Throughput ratios are baseline time / time (1.0: as fast as training); ``qv / pass`` is the query
vectors' time over the candidate pass's. Rank-r query vectors (``--ranks``) are scored too, with
their Spearman against the full ones.
"""

from __future__ import annotations

import argparse

import torch
from common import describe, model_and_data, model_arguments, timed, train_pass
from scipy.stats import spearmanr

from msif.curvature.fit import FitConfig, fit_factors
from msif.curvature.hooks import per_example_factors, per_example_grads
from msif.curvature.precondition import _factored_cheaper, _rotation_cost, chain
from msif.data.encoding import Encoded, collate
from msif.influence.scoring import low_rank, score_batches
from msif.models.adapters import tracked_modules

PROMPT, ANSWER = 20, 4
DAMPING = "0.1x"


def queries(Q: int, vocab: int, g: torch.Generator):
    """``Q`` random prompts with 4-token answers, one batch."""
    T = PROMPT + ANSWER
    return collate([Encoded(torch.randint(0, vocab, (T,), generator=g).tolist(),
                            [False] * (PROMPT - 1) + [True] * ANSWER + [False], index=i) for i in range(Q)])


def fused_vectors(model, tms, stages, batch) -> dict:
    """The attribution route: factored gradients where smaller, both stages in one chain."""
    grads = {n: f if f.worth_it() else f.dense() for n, f in per_example_factors(model, tms, batch, "answer").items()}
    return chain(stages, grads, torch.float32)


def separate_vectors(model, tms, stages, batch) -> dict:
    """The route before: dense gradients, each stage preconditioned on its own."""
    U = per_example_grads(model, tms, batch, "answer")
    for fs, lam in stages:
        U = fs.precondition(U, lam, dtype=torch.float32)
    return U


def floor_ratio(model, tms, Q: int, T_query: int, tokens: int) -> float:
    """Multiply-adds of ``Q`` exact MS-IF query vectors over those of the training pass (see the module doc)."""
    qv = 0
    for tm in tms:
        first = (T_query * (sum(b.out_dim ** 2 for b in tm.blocks) + tm.in_dim ** 2 + tm.out_features * tm.in_dim)
                 if _factored_cheaper(tm, T_query) else T_query * tm.out_features * tm.in_dim + _rotation_cost(tm))
        qv += first + 2 * _rotation_cost(tm)
    head = model.get_output_embeddings().weight.numel()
    train = 3 * tokens * (sum(tm.out_features * tm.in_dim for tm in tms) + head)
    return Q * qv / train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, "--candidates")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 32])
    args = ap.parse_args()
    model, data, g = model_and_data(args)
    tms = tracked_modules(model)
    half = max(1, len(data) // 2)
    cfg = FitConfig(strategy="ekfac")
    stages = [(fit_factors(model, data[:half], cfg, fingerprint="ft"), DAMPING),
              (fit_factors(model, data[half:] or data, cfg, fingerprint="pt"), DAMPING)]
    base = timed(lambda: train_pass(model, data), args.repeats)
    print(describe(model, args, "candidates"))
    print(f"baseline training pass: {base:.3f} s ({args.n / base:.1f} candidates/s)")
    print("| queries | query vectors (separate → chained) | candidate pass | end to end | throughput (end to end) "
          "| qv / pass | qv / pass in multiply-adds |")
    print("|---|---|---|---|---|---|---|")
    for Q in args.queries:
        batch = queries(Q, args.vocab, g)
        out = {}
        t_old = timed(lambda: separate_vectors(model, tms, stages, batch), args.repeats)
        t_qv = timed(lambda: out.__setitem__("U", fused_vectors(model, tms, stages, batch)), args.repeats)
        U = out["U"]
        ref = separate_vectors(model, tms, stages, batch)
        err = max(float((U[n] - ref[n]).norm() / ref[n].norm()) for n in U)
        t_pass = timed(lambda: out.__setitem__("r", score_batches(model, tms, U, data)), args.repeats)
        floor = floor_ratio(model, tms, Q, batch.input_ids.shape[1], args.n * args.seq)
        print(f"| {Q} | {t_old:.3f} s → {t_qv:.3f} s ({t_old / t_qv:.2f}× faster; rel. diff {err:.1e}) | {t_pass:.3f} s "
              f"(ratio {base / t_pass:.2f}) | {t_qv + t_pass:.3f} s | {base / (t_qv + t_pass):.2f} | {t_qv / t_pass:.2f} "
              f"| {floor:.2f} |")
        full = out["r"]
        for r in args.ranks:
            lr = low_rank(U, tms, r)
            t = timed(lambda: out.__setitem__("lr", score_batches(model, tms, lr, data)), args.repeats)
            rho = [spearmanr(out["lr"].scores[q], full.scores[q])[0] for q in range(Q)]
            print(f"|   rank-{r} query vectors | | {t:.3f} s (ratio {base / t:.2f}); Spearman vs full {sum(rho) / len(rho):.3f} | | | | |")


if __name__ == "__main__":
    main()
