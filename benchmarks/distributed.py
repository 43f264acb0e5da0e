"""Fit and scoring throughput with 1 and 2 ranks (torchrun, gloo on CPU, one thread per rank), as a ratio.

    python benchmarks/distributed.py [--shape 14m] [--fit-examples 128] [--documents 256] [--nproc 1 2]

Per rank count: `torchrun --standalone --nproc-per-node N -m msif fit` on the probe corpus (benchmarks/probe.py)
and `… -m msif attribute --retriever all` over ``--documents`` documents. Printed: the fit's data-pass
time from its own timings (covariance + eigenvalue-correction passes, examples/s), its
eigendecomposition time, the whole commands' wall clock (process start, model loading and
query vectors included), and the speed-up of N ranks over one. On a 2-core machine two ranks of one
thread each are the most it can show: a ratio near 2 is the ceiling, the collectives and the per-rank
start-up are what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def torchrun(n: int, *args) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "msif", *map(str, args)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return wall


def main():
    from probe import build

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="14m")
    ap.add_argument("--fit-examples", type=int, default=128)
    ap.add_argument("--documents", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("MSIF_DIST_BENCH", "/tmp/msif-dist-bench")))
    a = ap.parse_args()
    work = build(a.shape, a.out / a.shape, documents=a.documents, sft=16)
    model, corpus = work / "model", work / f"corpus-{a.documents}.jsonl"
    if not corpus.exists():
        corpus = next(work.glob("corpus-*.jsonl"))
    ft = a.out / a.shape / "factors-ft"
    if not ft.exists():
        torchrun(1, "fit", model, next(work.glob("sft-*.jsonl")), "--out", ft, "--objective", "answer", "--no-progress")
    rows = {}
    for n in a.nproc:
        out = a.out / a.shape / f"factors-pt-{n}"
        fit_wall = torchrun(n, "fit", model, corpus, "--out", out, "--max-examples", a.fit_examples,
                            "--batch-size", a.batch_size, "--no-progress", "--restart")
        tim = json.loads((out / "factors.json").read_text())["timings"]
        passes = tim["covariance_s"] + tim["lambda_s"]
        attr_wall = torchrun(n, "attribute", "--pretrained", model, "--finetuned", model, "--corpus", corpus,
                             "--pretrained-factors", out, "--finetuned-factors", ft, "--prompt", "w10 w11 w12",
                             "--answer", " w13", "--retriever", "all", "--chunk-size", 32, "--batch-size", a.batch_size,
                             "--json", "--no-progress")
        rows[n] = dict(passes_s=passes, eig_s=tim["eigendecomposition_s"], fit_wall_s=fit_wall, attr_wall_s=attr_wall,
                       fit_ex_per_s=2 * a.fit_examples / passes)
    base = rows[a.nproc[0]]
    print(f"shape {a.shape}; fit on {a.fit_examples} documents, scoring {a.documents} documents; one thread per rank")
    print(f"{'ranks':>5} {'fit passes':>11} {'ex/s':>7} {'eigh':>7} {'fit wall':>9} {'attribute wall':>15}   speed-up (passes, fit wall, attribute wall)")
    for n, r in rows.items():
        print(f"{n:>5} {r['passes_s']:>10.1f}s {r['fit_ex_per_s']:>7.1f} {r['eig_s']:>6.1f}s {r['fit_wall_s']:>8.1f}s "
              f"{r['attr_wall_s']:>14.1f}s   {base['passes_s'] / r['passes_s']:.2f}x, {base['fit_wall_s'] / r['fit_wall_s']:.2f}x, "
              f"{base['attr_wall_s'] / r['attr_wall_s']:.2f}x")


if __name__ == "__main__":
    main()
