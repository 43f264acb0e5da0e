"""msif beside Kronfluence 1.0.1: EK-FAC fit and pairwise-score times on one model and one data set, in
one process, as ratios to a plain training pass; and how closely the two libraries' scores agree.

    bash benchmarks/vs_kronfluence.sh [--quick] [--repeats 1] [--damping D] [--hidden 256] [--layers 4] ...

The shell script builds its own venv (benchmarks/.venv-kronfluence: msif, Kronfluence and the few
packages Kronfluence imports, torch kept at the local CPU build) on first use and runs this file in
it; Kronfluence is never a dependency of msif. ``--quick``: a smoke-run shape (2 layers, hidden 64,
16 sequences of 32 tokens).

Measured (each the best of ``--repeats`` wall-clock runs after one warm-up):

* baseline: ``common.train_pass`` over all sequences (forward + backward with parameter gradients);
* EK-FAC fit with the empirical Fisher (data labels): msif ``fit_factors`` as a whole (covariance
  pass, float64 eigendecomposition, eigenvalue-correction pass), per head and per projection;
  Kronfluence ``Analyzer.fit_all_factors`` (the same three steps, each writing its factors to disk);
* scores of Q = 1, 16, 64 queries (the first Q sequences, measurement = their summed token loss)
  against all sequences as candidates. msif: the query vectors (per-example gradients +
  preconditioning, :func:`msif_query_vectors`) and the streamed candidate pass (``score_batches``),
  timed apart and added. Kronfluence: one ``compute_pairwise_scores`` call with all Q queries in one
  query batch (so one pass over the candidates, as msif), end to end: it loads the factors from
  disk, forms the query gradients, preconditions them, scores, and writes the scores (temp folder);
* agreement: Spearman and Pearson of msif's per-projection scores (and, for information, per-head)
  against Kronfluence's, over all query × candidate pairs and the worst single query.

Fit times print as time / baseline (lower is faster), score times as baseline / time (throughput
relative to training: higher is faster).

The settings are equal by construction, and no rescaling is needed: both use the same modules
(msif's ``tracked_modules(per_head=False)``, passed to Kronfluence's
``Task.get_influence_tracked_modules``; the fused ``query_key_value`` is one block in both), a bias
column in ``A``, per-sequence gradients that are sums over tokens of the summed token loss, ``A`` and
``S`` as token means (only their eigenvectors enter EK-FAC), ``Λ`` as the mean over sequences of
``(Q_Sᵀ DW_n Q_A)²``, the damping added to ``Λ`` as one absolute value, float32 statistics and
float64 eigendecompositions. The run prints both libraries' mean ``Λ`` as a check of that.
Default damping: 0.1 × msif's mean eigenvalue over all per-projection blocks (msif's ``"0.1x"``
and Kronfluence's own heuristic, except that Kronfluence takes the mean per module), passed as
the same absolute number to both and to msif's per-head fit.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import warnings

import msif  # noqa: F401  (first: passive OpenMP waiting for both libraries, set before torch loads)
import torch
import torch.nn.functional as F
from common import describe, model_and_data, model_arguments, timed, train_pass
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from scipy.stats import pearsonr, spearmanr

from msif.curvature.fit import FitConfig, fit_factors
from msif.curvature.hooks import per_example_factors
from msif.curvature.precondition import Factored, chain
from msif.data.encoding import Batch
from msif.influence.scoring import score_batches
from msif.models.adapters import tracked_modules
from msif.objectives import data_targets

QUICK = dict(layers=2, hidden=64, heads=4, n=16, seq=32)
# Kronfluence 1.0.1 builds a (disabled) torch.cuda.amp.GradScaler in every pass: torch deprecates the name
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)

VARIANTS = {"per-head": True, "per-projection": False}  # msif's two block layouts
KF = "Kronfluence"
COLUMNS = (*VARIANTS, KF)
QUERIES = (1, 16, 64)
AGREEMENT_QUERIES = (1, 16)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, "--examples")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (best kept)")
    ap.add_argument("--damping", type=float, default=None,
                    help="absolute damping for both libraries (default: 0.1 × msif's mean eigenvalue)")
    ap.add_argument("--quick", action="store_true", help="smoke-run shape: 2 layers, hidden 64, 16 sequences of 32 tokens")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    return args


def best(fn, repeats: int):
    """``(best time, result of the last run)`` of ``fn()`` (:func:`common.timed`)."""
    out = {}
    t = timed(lambda: out.__setitem__("r", fn()), repeats)
    return t, out["r"]


# ---------------------------------------------------------------------------------------------------
# msif
# ---------------------------------------------------------------------------------------------------


def msif_fit(model, data, per_head: bool):
    return fit_factors(model, data, FitConfig(strategy="ekfac", labels="empirical", per_head=per_head),
                       fingerprint="bench")


def msif_query_vectors(model, tms, fs, query_batches, damping: float) -> dict[str, torch.Tensor]:
    """``U = (G + λ)⁻¹ ∇m`` for every query sequence: module → ``(Q, out, in_dim)``, the way
    ``msif attribute`` makes them (factored per-example gradients, :func:`precondition.chain`)."""
    parts = [per_example_factors(model, tms, b, "lm") for b in query_batches]
    grads = {n: Factored.cat([p[n] for p in parts]) for n in parts[0]}
    grads = {n: f if f.worth_it() else f.dense() for n, f in grads.items()}
    del parts
    return chain([(fs, damping)], grads)


def first_sequences(data: list[Batch], q: int, size: int) -> list[Batch]:
    """The first ``q`` sequences of ``data`` as batches of at most ``size``."""
    cat = lambda f: torch.cat([getattr(b, f) for b in data])[:q]  # noqa: E731
    ids, am, tm, idx = cat("input_ids"), cat("attention_mask"), cat("target_mask"), cat("indices")
    return [Batch(ids[i : i + size], am[i : i + size], tm[i : i + size], None, idx[i : i + size]) for i in range(0, q, size)]


def msif_scores(model, tms, fs, data, Q: int, damping: float, args):
    """``(query-vector time, candidate-pass time, scores (Q, N))`` of the first ``Q`` sequences."""
    qb = first_sequences(data, Q, args.batch)
    t_qv, U = best(lambda: msif_query_vectors(model, tms, fs, qb, damping), args.repeats)
    t_pass, res = best(lambda: score_batches(model, tms, U, data), args.repeats)
    return t_qv, t_pass, res.scores


# ---------------------------------------------------------------------------------------------------
# Kronfluence
# ---------------------------------------------------------------------------------------------------


class SummedTokenLoss(Task):
    """Train loss and measurement alike: the summed token cross-entropy with the data's labels (msif's
    ``"lm"`` objective), on msif's tracked modules only."""

    def __init__(self, modules: list[str]):
        super().__init__()
        self.modules = modules

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        if sample:  # only reached for the true Fisher; FactorArguments(use_empirical_fisher=True) never asks
            raise ValueError("this comparison uses the empirical Fisher only")
        return self.compute_measurement(batch, model)

    def compute_measurement(self, batch, model) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch) -> torch.Tensor:
        return batch["attention_mask"]


def as_rows(data: list[Batch]) -> list[dict]:
    """msif's batches as a map-style dataset of dicts (the labels are msif's own ``data_targets``)."""
    rows = []
    for b in data:
        labels = data_targets(b, "lm")
        rows += [dict(input_ids=b.input_ids[i], attention_mask=b.attention_mask[i], labels=labels[i]) for i in range(b.size)]
    return rows


class Kronfluence:
    """One ``Analyzer`` on a copy of the model (``prepare_model`` wraps its linears and freezes its
    weights in place), on the CPU, in this process, without DataLoader workers."""

    def __init__(self, model, modules: list[str], batch: int, out_dir: str):
        task = SummedTokenLoss(modules)
        self.analyzer = Analyzer("vs_msif", prepare_model(copy.deepcopy(model), task), task, cpu=True,
                                 log_level=logging.WARNING, disable_tqdm=True, output_dir=out_dir)
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        self.batch = batch

    def fit(self, rows: list[dict]) -> None:
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)  # float32 sums, float64 eigh: defaults
        self.analyzer.fit_all_factors("ekfac", rows, per_device_batch_size=self.batch, factor_args=args,
                                      overwrite_output_dir=True)

    def scores(self, queries: list[dict], rows: list[dict], damping: float) -> torch.Tensor:
        """``(Q, N)`` scores: computed and written to disk, then read back as a user does."""
        name = f"q{len(queries)}"
        self.analyzer.compute_pairwise_scores(
            name, "ekfac", queries, rows, per_device_query_batch_size=len(queries),
            per_device_train_batch_size=self.batch, score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True)
        return self.analyzer.load_pairwise_scores(name)["all_modules"]

    def mean_lambda(self) -> float:
        """Mean of ``Λ`` over every entry of every module (msif: :meth:`FactorSet.mean_eigenvalue`)."""
        lam = self.analyzer.load_lambda_matrices("ekfac")
        mats, counts = lam["lambda_matrix"], lam["num_lambda_processed"]
        total = sum(float(mats[m].double().sum()) / float(counts[m]) for m in mats)
        return total / sum(mats[m].numel() for m in mats)


# ---------------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------------


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Spearman and Pearson over all query × candidate pairs, and the lowest per-query Spearman.

    The queries are candidates too, so the scores' ``Q × Q`` block is symmetric: each of its values
    occurs twice, and the two libraries' rounding orders every such pair at random, which alone keeps
    the pooled Spearman a little under 1 (not the per-query one)."""
    a, b = a.double().numpy(), b.double().numpy()
    per_query = min(spearmanr(x, y)[0] for x, y in zip(a, b))
    return spearmanr(a.ravel(), b.ravel())[0], pearsonr(a.ravel(), b.ravel())[0], per_query


def check_blocks(tms: dict) -> None:
    pp, ph = tms["per-projection"], tms["per-head"]
    qkv = [tm for tm in pp if tm.name.endswith("query_key_value")]
    assert all(len(tm.blocks) == 1 for tm in pp), "per_head=False should give one block per module"
    print(f"tracked: {len(pp)} linears ({len(qkv)} fused query_key_value of {qkv[0].out_features} rows, each ONE block "
          f"per projection, as Kronfluence's nn.Linear; per head: {sum(len(tm.blocks) for tm in ph)} blocks)")


def run(args) -> dict:
    """Every measurement: ``base``; ``fit[col]``; ``time[col][Q] = (query vectors, candidate pass)``
    (Kronfluence's whole call as its second part); ``scores[col][Q]`` ``(Q, N)``."""
    model, data, _ = model_and_data(args)
    print(describe(model, args, "sequences"))
    base = timed(lambda: train_pass(model, data), args.repeats)
    print(f"baseline (plain training pass): {base:.3f} s")
    tms = {k: tracked_modules(model, per_head=ph) for k, ph in VARIANTS.items()}
    check_blocks(tms)
    out = dict(base=base, qs=sorted({min(q, args.n) for q in QUERIES}), fit={}, time={k: {} for k in COLUMNS},
               scores={k: {} for k in COLUMNS})
    fs = {}
    for k, ph in VARIANTS.items():
        out["fit"][k], fs[k] = best(lambda: msif_fit(model, data, ph), args.repeats)
    damping = args.damping if args.damping is not None else 0.1 * fs["per-projection"].mean_eigenvalue()
    rows = as_rows(data)
    with tempfile.TemporaryDirectory() as tmp:
        kf = Kronfluence(model, [tm.name for tm in tms["per-projection"]], args.batch, tmp)
        out["fit"][KF], _ = best(lambda: kf.fit(rows), args.repeats)
        print(f"mean Λ: msif {fs['per-projection'].mean_eigenvalue():.6g}, Kronfluence {kf.mean_lambda():.6g}; "
              f"damping (absolute, both): {damping:.4g}")
        for Q in out["qs"]:
            for k in VARIANTS:
                t_qv, t_pass, out["scores"][k][Q] = msif_scores(model, tms[k], fs[k], data, Q, damping, args)
                out["time"][k][Q] = (t_qv, t_pass)
            t, out["scores"][KF][Q] = best(lambda: kf.scores(rows[:Q], rows, damping), args.repeats)
            out["time"][KF][Q] = (0.0, t)
    return out


def quer(q: int) -> str:
    return f"{q} quer{'y' if q == 1 else 'ies'}"


def table(r: dict, n: int) -> str:
    base, qs = r["base"], r["qs"]
    total = lambda k, q: sum(r["time"][k][q])  # noqa: E731
    row = lambda head, cells: f"| {head} | " + " | ".join(cells) + " |"  # noqa: E731
    lines = [row("ratio to a plain training pass", [f"msif {k}" for k in VARIANTS] + [KF]), "|---|---|---|---|",
             row("EK-FAC fit (lower is faster)", [f"{r['fit'][k] / base:.2f}× ({r['fit'][k]:.2f} s)" for k in COLUMNS])]
    for q in qs:
        lines.append(row(f"scores, {quer(q)} × {n} candidates (higher is faster)",
                         [f"{base / total(k, q):.3f}× ({total(k, q):.2f} s)" for k in COLUMNS]))
    share = lambda k: " / ".join(f"{r['time'][k][q][0] / total(k, q):.0%}" for q in qs)  # noqa: E731
    lines.append(row(f"msif query vectors: share of the scoring time ({' / '.join(map(str, qs))} queries)",
                     [share(k) for k in VARIANTS] + ["—"]))
    for q in (q for q in qs if q in AGREEMENT_QUERIES):
        rho = {k: agreement(r["scores"][k][q], r["scores"][KF][q]) for k in VARIANTS}
        cells = ["{:.5f} / {:.5f} (worst query {:.5f})".format(*rho[k]) for k in VARIANTS]
        lines.append(row(f"Spearman / Pearson vs Kronfluence, {quer(q)}", cells + ["—"]))
    return "\n".join(lines)


def report(r: dict, n: int) -> None:
    qs = r["qs"]
    total = lambda k, q: sum(r["time"][k][q])  # noqa: E731
    print("\n" + table(r, n) + "\n")
    for k in VARIANTS:
        print(f"msif {k} / Kronfluence throughput: " + ", ".join(f"{quer(q)} {total(KF, q) / total(k, q):.2f}×" for q in qs))
    for k in COLUMNS:
        print(f"from scratch (fit + scores), {k if k == KF else 'msif ' + k}: "
              + ", ".join(f"{quer(q)} {r['fit'][k] + total(k, q):.2f} s" for q in qs))
    for q in qs:
        a, b = r["scores"]["per-projection"][q], r["scores"][KF][q].double()
        print(f"{quer(q)}: max |msif per-projection − Kronfluence| / max |Kronfluence| = "
              f"{float((a - b).abs().max() / b.abs().max()):.2e}")


def main():
    args = parse_args()
    report(run(args), args.n)


if __name__ == "__main__":
    main()
