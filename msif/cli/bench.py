"""``msif bench …``: the paper's experiments and the counterfactual checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .app import bench_app, console
from .failures import _fail, user_errors


@bench_app.command("fact-tracing")
@user_errors
def bench_fact_tracing(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="Tiny world, smaller candidate sets, 2 trials unless --trials (minutes)."),
    out: Path = typer.Option(Path("runs/fact-tracing"), "--out", help="Folder for fact_tracing.json/.md/.png and the cache."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials (query subsets, pools, label-sampling seeds); default 3 (quick: 2)."),
    queries: Optional[int] = typer.Option(None, "--queries", help="Queries per trial (default 150; all test facts when fewer)."),
    size: Optional[str] = typer.Option(None, "--size", help="World size preset (default: full; quick: tiny)."),
    world: str = typer.Option("standard", "--world", help="World variant: standard, or hard (sources by alias and reworded, negated near-misses)."),
    k_candidates: Optional[int] = typer.Option(None, "--candidates", help="Embedding nearest neighbours per query (default 100; quick: 50)."),
    pool_size: Optional[int] = typer.Option(None, "--pool", help="Fixed rerank pool size (default 100; quick: 50)."),
    dampings: Optional[str] = typer.Option(None, "--dampings", help="Comma-separated dampings: absolute (default 1e-8,...,1e-2) or relative to each factor set's mean eigenvalue (0.01x,0.1x,1x)."),
    classification: bool = typer.Option(True, "--classification/--no-classification", help="Also trace the classification fine-tune."),
    refine_basis: int = typer.Option(0, "--refine-basis", help="Basis-refinement passes of every EK-FAC fit (as in msif fit)."),
    refine_query: int = typer.Option(0, "--refine-query", help="CG steps per stage refining every MS-IF / SS-IF query vector on the full GGN (as in msif attribute)."),
    gvp_examples: int = typer.Option(64, "--gvp-examples", help="Examples of each stage's data in the GGN of --refine-query."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder for factors and the index (default: OUT/cache)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Fact tracing (paper §5.3): MRR / Recall@10 of MS-IF, SS-IF, GDP, RepSim, BM25 and embeddings over dampings."""
    from dataclasses import replace

    from ..eval.fact_tracing import FactTracingConfig, quick_config, run_fact_tracing, write_outputs

    cfg = quick_config() if quick else FactTracingConfig()
    over = {"threads": threads, "classification": classification, "refine": refine_basis, "refine_query": refine_query,
            "gvp_examples": gvp_examples, "world": world}
    from ..worldfacts.build import WORLDS

    if world not in WORLDS:
        _fail(f"--world must be one of {', '.join(WORLDS)}, not {world!r}")
    if refine_query < 0 or gvp_examples < 1:
        _fail("--refine-query must be ≥ 0 and --gvp-examples ≥ 1")
    for name, v in (("trials", trials), ("n_queries", queries), ("size", size), ("k_candidates", k_candidates),
                    ("pool_size", pool_size)):
        if v is not None:
            over[name] = v
    if dampings:
        from ..curvature.damping import Damping

        try:
            parsed = [Damping.parse(x) for x in dampings.split(",") if x.strip()]
        except ValueError:
            _fail(f"--dampings must be comma-separated numbers ≥ 0 (absolute) or multiples like 0.1x (relative), not {dampings!r}")
        if not parsed or len({d.relative for d in parsed}) > 1:
            _fail("--dampings: give absolute values or relative ones (0.1x), not both")
        over["dampings"] = tuple(d.to_json() for d in parsed)
    if over.get("trials", 1) < 1 or over.get("n_queries", 1) < 1:
        _fail("--trials and --queries must be ≥ 1")
    cfg = replace(cfg, **over)
    res = run_fact_tracing(cfg, cache_dir=cache or out / "cache", progress=progress)
    paths = write_outputs(res, out)
    console.print(f"[green]fact tracing[/] done in {res['timings_s']['total']:.1f}s → "
                  + ", ".join(str(p) for p in paths.values()))
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["timings_s"].items()))
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    else:
        console.print(paths["markdown"].read_text(), markup=False, highlight=False)


def _check_bench_options(world: str, damping: str) -> None:
    """The options every counterfactual benchmark shares: the world variant and the damping."""
    from ..curvature.damping import Damping
    from ..worldfacts.build import WORLDS

    if world not in WORLDS:
        _fail(f"--world must be one of {', '.join(WORLDS)}, not {world!r}")
    try:
        Damping.parse(damping)
    except ValueError:
        _fail(f"--damping must be a finite number ≥ 0 or a multiple of the mean eigenvalue (0.1x), not {damping!r}")


def _report_bench(label: str, res: dict, paths: dict, seconds: float, json_out: bool) -> None:
    """Where a benchmark wrote its outputs, then its JSON (``--json``) or its markdown table."""
    console.print(f"[green]{label}[/] done in {seconds:.1f}s → " + ", ".join(str(p) for p in paths.values()))
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    else:
        console.print(paths["markdown"].read_text(), markup=False, highlight=False)


@bench_app.command("tail-patch")
@user_errors
def bench_tail_patch(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="Tiny world, k ∈ {1, 3}, 2 trials, 3 groups (a minute or two)."),
    out: Path = typer.Option(Path("runs/tail-patch"), "--out", help="Folder for tail_patch.json/.md/.png and the cache."),
    world: str = typer.Option("standard", "--world", help="World variant: standard or hard."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials (query subsets, groupings, random documents, fit seeds); default 3 (quick: 2)."),
    queries: Optional[int] = typer.Option(None, "--queries", help="Test facts per trial (default 100; all when fewer)."),
    ks: Optional[str] = typer.Option(None, "--k", help="Comma-separated documents patched per query (default 3,10; quick: 1,3)."),
    step: Optional[float] = typer.Option(None, "--step", help="Size of each query's patch, as a fraction of ‖θ_pt‖ (default 0.003), along the negative gradient of its documents' loss."),
    groups: Optional[int] = typer.Option(None, "--groups", help="Query groups per trial: one patched fine-tune per (method, k, group)."),
    damping: str = typer.Option("0.1x", "--damping", help="λ of MS-IF / SS-IF (both stages), absolute or relative (0.1x)."),
    workers: int = typer.Option(2, "--workers", help="Processes re-fine-tuning in parallel (one thread each)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder for factors and the index (default: OUT/cache)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads for the rankings."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Multi-stage tail-patch: patch θ_pt on each method's top-k documents, redo the fine-tuning, measure Δ log p(answer)."""
    from dataclasses import replace

    from ..eval.tail_patch import TailPatchConfig, quick_config, run_tail_patch, write_outputs

    _check_bench_options(world, damping)
    over: dict = {"world": world, "workers": workers, "threads": threads}
    if ks is not None:
        try:
            over["ks"] = tuple(sorted({int(x) for x in ks.split(",") if x.strip()}))
        except ValueError:
            _fail(f"--k must be comma-separated whole numbers ≥ 1, not {ks!r}")
        if not over["ks"] or over["ks"][0] < 1:
            _fail(f"--k must be comma-separated whole numbers ≥ 1, not {ks!r}")
    for flag, name, v, lo in (("--trials", "trials", trials, 1), ("--queries", "n_queries", queries, 2), ("--groups", "groups", groups, 2),
                              ("--workers", "workers", workers, 1)):
        if v is not None:
            if v < lo:
                _fail(f"{flag} must be ≥ {lo}, not {v}")
            over[name] = v
    if step is not None:
        if not (0 < step < float("inf")):
            _fail(f"--step must be a finite number > 0 (a fraction of ‖θ_pt‖, e.g. 0.003), not {step}")
        over["step"] = step
    over["damping"] = damping
    cfg = replace(quick_config() if quick else TailPatchConfig(), **over)
    res = run_tail_patch(cfg, cache_dir=cache or out / "cache", progress=progress)
    _report_bench("tail-patch", res, write_outputs(res, out), res["timings_s"]["total"], json_out)


@bench_app.command("ms-lds")
@user_errors
def bench_ms_lds(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="16 subsets instead of 64 (a minute or two)."),
    out: Path = typer.Option(Path("runs/ms-lds"), "--out", help="Folder for ms_lds.json/.md/.png and the cache."),
    world: str = typer.Option("standard", "--world", help="World variant: standard or hard."),
    size: str = typer.Option("tiny", "--size", help="World size preset (every subset is pre-trained and fine-tuned anew: keep it small)."),
    subsets: Optional[int] = typer.Option(None, "--subsets", help="Random subsets of the pre-training corpus (default 64; quick: 16)."),
    fraction: float = typer.Option(0.5, "--fraction", help="Share of the corpus in each subset."),
    damping: str = typer.Option("0.1x", "--damping", help="λ of MS-IF / SS-IF (both stages), absolute or relative (0.1x)."),
    workers: int = typer.Option(2, "--workers", help="Processes retraining in parallel (one thread each)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder for factors (default: OUT/cache)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads for the scores."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Multi-stage LDS: pre-train on random halves of the corpus, fine-tune each the same way, correlate the query losses with each method's summed scores."""
    from dataclasses import replace

    from ..eval.ms_lds import MSLDSConfig, quick_config, run_ms_lds, write_outputs
    from ..worldfacts.build import SIZES

    _check_bench_options(world, damping)
    if size not in SIZES:
        _fail(f"--size must be one of {', '.join(SIZES)}, not {size!r}")
    if subsets is not None and subsets < 3:
        _fail(f"--subsets must be ≥ 3 (a correlation over subsets), not {subsets}")
    if not 0 < fraction < 1:
        _fail(f"--fraction must be between 0 and 1 (exclusive), not {fraction}")
    if workers < 1:
        _fail(f"--workers must be ≥ 1, not {workers}")
    over = {"world": world, "size": size, "fraction": fraction, "damping": damping, "workers": workers, "threads": threads}
    if subsets is not None:
        over["n_subsets"] = subsets
    cfg = replace(quick_config() if quick else MSLDSConfig(), **over)
    res = run_ms_lds(cfg, cache_dir=cache or out / "cache", progress=progress)
    _report_bench("ms-lds", res, write_outputs(res, out), res["cost"]["total_s"], json_out)


@bench_app.command("scalability")
@user_errors
def bench_scalability(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    quick: bool = typer.Option(False, "--quick", help="Test-sized study (hidden 8, 4 queries x 100 candidates; minutes)."),
    out: Path = typer.Option(Path("runs/scalability"), "--out", help="Folder for results.json, table.md and the PNG plots."),
    lds: bool = typer.Option(False, "--lds", help="Also the linear datamodeling score (retraining on random halves; quick-sized)."),
    threads: int = typer.Option(2, "--threads", help="Torch CPU threads."),
    progress: bool = typer.Option(True, help="Log the stages on stderr."),
):
    """Scalability study (paper §5.1, Table 1 / Figure 1): Spearman of EK-FAC and baselines against a CG ground truth."""
    import torch

    from ..eval import scalability as sc
    from ..eval import scalability_report as report

    torch.set_num_threads(max(1, threads))
    log = (lambda m: console.print(f"[dim]{m}[/]")) if progress else None
    res = sc.run(sc.QUICK if quick else sc.ScalabilityConfig(), progress=log)
    if lds:
        from ..eval import lds as lds_mod

        res["lds"] = lds_mod.run(lds_mod.LDSConfig(), progress=log)
    paths = report.write_outputs(res, out)
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1, default=float) + "\n")
    else:
        text = report.markdown_table(res)
        if lds:
            text += "\n\n" + Path(paths["lds_table"]).read_text()
        console.print(text, markup=False, highlight=False)
    console.print(f"[green]scalability[/] done in {res['total_time_s']:.1f}s → " + ", ".join(paths.values()))
