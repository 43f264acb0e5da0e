"""Peak RSS and documents/s of ``msif attribute --retriever all`` on a Pythia-shaped probe, at two corpus
sizes: memory must not grow with the corpus (ratio ≈ 1).

    python benchmarks/attribute_memory.py --shape 70m --out /tmp/probe70m --documents 200 2000 --queries 1 16

Builds the probe with ``probe.build`` (reused when there), fits the pre-trained and fine-tuned factors
once (``OUT/fpt``, ``OUT/fft``), then runs every (queries, documents) pair in its own process under
``/usr/bin/time -v`` and prints its peak RSS ("Maximum resident set size"), wall time and documents/s,
and per query count the ratio of the peak RSS at the largest corpus to that at the smallest.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from probe import build  # noqa: E402


def msif(*args) -> list[str]:
    return [sys.executable, "-m", "msif.cli", *map(str, args)]


def fit_once(out: Path) -> None:
    for name, data, extra in (("fpt", "corpus-64.jsonl", ()), ("fft", "sft-64.jsonl", ("--objective", "answer"))):
        if not (out / name / "factors.json").exists():
            subprocess.run(msif("fit", out / "model", out / data, "--out", out / name, "--max-examples", 64,
                                "--no-progress", *extra), check=True)


def queries_file(out: Path, n: int) -> Path:
    p = out / f"queries-{n}.jsonl"
    if not p.exists():
        rows = [json.loads(line) for line in (out / "sft-64.jsonl").read_text().splitlines()[:n]]
        p.write_text("".join(json.dumps({"id": f"q{i}", "prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                             for i, r in enumerate(rows)))
    return p


def run(out: Path, documents: int, n_queries: int, extra: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-v", *msif(
        "attribute", "--pretrained", out / "model", "--finetuned", out / "model", "--pretrained-factors", out / "fpt",
        "--finetuned-factors", out / "fft", "--corpus", out / f"corpus-{documents}.jsonl", "--retriever", "all",
        "--top", 10, "--queries", queries_file(out, n_queries), "--json", "--no-progress", *extra)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"documents": documents, "queries": n_queries, "peak_rss_gb": rss_kb * 1024 / 1e9, "wall_s": wall,
            "docs_per_s": documents / wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="70m")
    ap.add_argument("--out", type=Path, default=Path("/tmp/probe70m"))
    ap.add_argument("--documents", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--extra", default="", help="More `msif attribute` options, e.g. '--dtype bfloat16'.")
    a = ap.parse_args()
    for n in a.documents:
        build(a.shape, a.out, documents=n)
    fit_once(a.out)
    results = []
    for q in a.queries:
        for n in a.documents:
            r = run(a.out, n, q, a.extra.split())
            results.append(r)
            print(f"queries {q:3d}  documents {n:6d}  peak RSS {r['peak_rss_gb']:.2f} GB  wall {r['wall_s']:.0f} s  "
                  f"{r['docs_per_s']:.2f} docs/s (wall, incl. loading)", flush=True)
        rs = [r for r in results if r["queries"] == q]
        if len(rs) > 1:
            print(f"queries {q:3d}  peak RSS ratio {rs[-1]['documents']}/{rs[0]['documents']} documents: "
                  f"{rs[-1]['peak_rss_gb'] / rs[0]['peak_rss_gb']:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
