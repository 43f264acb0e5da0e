"""msif on Pythia-shaped models: fit and scoring time against plain training, and the peak memory of
`msif fit` / `msif attribute` against `msif plan --json`'s prediction.

    python benchmarks/scale.py --shapes 70m --documents 1000 --fit-examples 64      # quick (minutes)
    python benchmarks/scale.py --shapes 70m 160m --documents 1000 10000             # the full table

Per shape (random init, built by benchmarks/probe.py into OUT/<shape>): the pt fit (``--objective lm`` on
the corpus) and the ft fit (``--objective answer`` on the sft data) are timed in this process as a ratio
to plain training steps (forward + backward with parameter gradients) over the same batches; each
`msif fit` and `msif attribute --retriever all` then runs in a child process that reports its own peak
memory (resident set on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU), printed against the plan
as measured / predicted. Also: the factor folder's size on disk against the plan's factor bytes, and
scoring throughput (candidates scored per second) as a ratio to a training pass over the same
candidates. Ratios only; nothing here asserts a wall-clock threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPT, ANSWER = "w10 w11 w12 w13 w14 w15", " w16 w17"


# ------------------------------------------------------------------------------- child measurement
def own_peak_rss() -> int:
    """This process's peak resident set: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: Linux
    carries the parent's high-water mark into a forked child across ``exec``, so a child started by a
    parent that had loaded a bigger model reported the parent's peak (measured: 6.63 GB for two
    different 160m children)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def child_main(argv: list[str]) -> None:
    """``scale.py --child OUT.json msif ARGS…``: run the msif CLI in this process, then write its peak
    memory (and the CUDA allocator's) to OUT.json."""
    out, args = argv[0], argv[2:]  # argv[1] == "msif"
    t0 = time.perf_counter()
    code = 0
    from msif.cli import app

    try:
        rv = app(args, standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except SystemExit as e:  # typer.Exit
        code = int(e.code or 0)
    except Exception as e:  # noqa: BLE001 (reported to the parent)
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    res = {"rc": code, "wall_s": time.perf_counter() - t0, "max_rss_bytes": own_peak_rss()}
    import torch

    if torch.cuda.is_available():
        res["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    Path(out).write_text(json.dumps(res))
    if code:
        sys.exit(code)


def measured(args: list[str], tag: str, work: Path) -> dict:
    """Run ``msif ARGS`` in a child process; its return code, wall time and peak memory."""
    out = work / f"{tag}.measure.json"
    out.unlink(missing_ok=True)
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(out), "msif", *map(str, args)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (work / f"{tag}.stdout").write_text(p.stdout)
    (work / f"{tag}.stderr").write_text(p.stderr)
    if p.returncode or not out.exists():
        tail = p.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"msif {' '.join(map(str, args[:2]))}… failed (rc {p.returncode}): {' | '.join(tail)}")
    return json.loads(out.read_text())


def has_flag(command: str, flag: str) -> bool:
    """Whether ``msif COMMAND`` takes ``flag`` (--dtype / --max-memory are landing while this is written)."""
    from typer.testing import CliRunner

    from msif.cli import app

    return flag in CliRunner().invoke(app, [command, "--help"], terminal_width=400).output


def plan_json(model: Path, args: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-m", "msif.cli", "plan", str(model), "--json", *map(str, args)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"msif plan failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def peak(m: dict, device: str) -> int:
    return m["cuda_max_allocated_bytes"] if device.startswith("cuda") else m["max_rss_bytes"]


# ----------------------------------------------------------------------------------- in-process timing
def fit_ratio(model_dir: Path, data: Path, objective: str, n: int, batch: int, device: str, dtype: str) -> dict:
    """Fit time (both passes + eigendecomposition) / one plain training pass over the same batches."""
    import torch
    from common import timed, train_pass

    from msif.curvature.fit import FitConfig, fit_factors
    from msif.data.examples import ExampleBatches
    from msif.models.loading import load_model, load_tokenizer

    model = load_model(str(model_dir), dtype=dtype, device=device)
    tok = load_tokenizer(str(model_dir))
    batches = [b.to(device) for b in ExampleBatches(str(data), tok, objective, batch_size=batch, max_examples=n)]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train():
        train_pass(model, batches, objective)

    t_train = timed(train, 1)
    t0 = time.perf_counter()
    fs = fit_factors(model, batches, FitConfig(objective=objective, batch_size=batch), fingerprint="bench")
    sync()
    t_fit = time.perf_counter() - t0
    del fs
    return {"train_pass_s": t_train, "fit_s": t_fit, "ratio": t_fit / t_train}


def score_ratio(model_dir: Path, pt: Path, ft: Path, corpus: Path, n: int, batch: int, device: str, dtype: str) -> dict:
    """Candidates scored per second / candidates per second of a training pass over the same documents."""
    import torch
    from common import timed, train_pass

    from msif.data.corpus import Corpus
    from msif.influence.attribute import Attributor, Query
    from msif.models.loading import load_model

    model = load_model(str(model_dir), dtype=dtype, device=device)
    att = Attributor(model, model, str(model_dir), pt_factors=str(pt), ft_factors=str(ft), batch_size=batch, device=device)
    texts = Corpus(str(corpus)).texts(range(n))
    prepared = att.prepare([Query(PROMPT, ANSWER)])
    batches = list(att._candidate_batches(att.encode_candidates(texts, range(n))))

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train():
        train_pass(model, batches, "lm")

    def score():
        att.score(prepared, texts, method="ms-if", per_token=False)
        sync()

    t_train, t_score = timed(train, 1), timed(score, 1)
    return {"candidates": n, "train_pass_s": t_train, "score_s": t_score, "ratio": t_score / t_train,
            "candidates_per_s": n / t_score}


# ------------------------------------------------------------------------------------------- the run
def run_shape(shape: str, a, work_root: Path) -> dict:
    from probe import build

    work = work_root / shape
    for n in a.documents:
        build(shape, work, documents=n, sft=a.fit_examples)
    model = work / "model"
    sft = work / f"sft-{a.fit_examples}.jsonl"
    small = work / f"corpus-{min(a.documents)}.jsonl"
    res: dict = {"shape": shape}
    extra = ["--device", a.device]
    # `--dtype` on `msif fit` / `msif attribute` is being added in parallel: passed only once it exists
    fit_dtype = ["--dtype", a.dtype] if has_flag("fit", "--dtype") else []
    att_dtype = ["--dtype", a.dtype] if has_flag("attribute", "--dtype") else []
    if not fit_dtype or not att_dtype:
        print(f"[{shape}] note: `msif fit/attribute` have no --dtype yet; the children run in the checkpoint's dtype (float32)")
    dtype = a.dtype if fit_dtype else "float32"

    if not a.skip_timing:
        res["fit_time_pt"] = fit_ratio(model, small, "lm", a.fit_examples, a.batch_size, a.device, dtype)
        res["fit_time_ft"] = fit_ratio(model, sft, "answer", a.fit_examples, a.batch_size, a.device, dtype)
        print(f"[{shape}] fit pt: {res['fit_time_pt']['ratio']:.2f}× a training pass, fit ft: {res['fit_time_ft']['ratio']:.2f}×")

    common = ["--batch-size", a.batch_size, "--max-examples", a.fit_examples, "--no-progress", *extra]
    m_pt = measured(["fit", model, small, "--out", work / "factors-pt", "--objective", "lm", *common, *fit_dtype], "fit-pt", work)
    m_ft = measured(["fit", model, sft, "--out", work / "factors-ft", "--objective", "answer", *common, *fit_dtype], "fit-ft", work)
    meta = json.loads((work / "factors-pt" / "factors.json").read_text())
    stats_dtype = meta.get("stats_dtype", "float32")
    ft_tokens = max(2, round(json.loads((work / "factors-ft" / "factors.json").read_text())["n_tokens"] / a.fit_examples))
    on_disk = dir_bytes(work / "factors-pt")

    for n in a.documents:
        corpus = work / f"corpus-{n}.jsonl"
        plan = plan_json(model, ["--corpus", corpus, "--fit-examples", a.fit_examples, "--finetune-examples", a.fit_examples,
                                 "--finetune-tokens", ft_tokens, "--batch-size", a.batch_size, "--stats-dtype", stats_dtype,
                                 "--dtype", dtype, "--device", a.device])
        st = {x["name"]: x for x in plan["stages"]}
        if n == min(a.documents):
            res["plan"] = plan
            res["fit_pt_memory"] = {"measured": peak(m_pt, a.device), "predicted": st["fit pt"]["peak_bytes"]}
            res["fit_ft_memory"] = {"measured": peak(m_ft, a.device), "predicted": st["fit ft"]["peak_bytes"]}
            res["factors_on_disk"] = {"measured": on_disk, "predicted": plan["factor_bytes"]}
        m_att = measured(["attribute", "--pretrained", model, "--finetuned", model, "--pretrained-factors", work / "factors-pt",
                          "--finetuned-factors", work / "factors-ft", "--corpus", corpus, "--retriever", "all",
                          "--prompt", PROMPT, "--answer", ANSWER, "--top", 5, "--json", "--batch-size", a.batch_size,
                          *extra, *att_dtype], f"attribute-{n}", work)
        res[f"attribute_memory_{n}"] = {"measured": peak(m_att, a.device), "predicted": max(st["scoring"]["peak_bytes"], st["query vectors"]["peak_bytes"]),
                                        "wall_s": m_att["wall_s"]}
    if not a.skip_timing:
        res["score_time"] = score_ratio(model, work / "factors-pt", work / "factors-ft", small, min(a.score_candidates, min(a.documents)),
                                        a.batch_size, a.device, dtype)
    return res


def report(res: dict) -> None:
    s = res["shape"]
    mb = lambda x: f"{x / 2**20:,.0f} MB"  # noqa: E731
    print(f"\n== Pythia-{s} shape ==")
    for key, label in (("fit_time_pt", "fit pt time / training pass"), ("fit_time_ft", "fit ft time / training pass")):
        if key in res:
            r = res[key]
            print(f"{label:<40} {r['ratio']:6.2f}   ({r['fit_s']:.1f} s vs {r['train_pass_s']:.1f} s)")
    if "score_time" in res:
        r = res["score_time"]
        print(f"{'scoring time / training pass':<40} {r['ratio']:6.2f}   ({r['candidates_per_s']:.1f} candidates/s over {r['candidates']})")
    print(f"{'':<40} {'measured':>10} {'predicted':>10} {'ratio':>6}")
    for key in [k for k in res if k.endswith("_memory") or k.startswith("attribute_memory") or k == "factors_on_disk"]:
        r = res[key]
        label = {"fit_pt_memory": "msif fit (pt) peak", "fit_ft_memory": "msif fit (ft) peak",
                 "factors_on_disk": "factor folder on disk"}.get(key, f"msif attribute peak, {key.rsplit('_', 1)[1]} documents")
        print(f"{label:<40} {mb(r['measured']):>10} {mb(r['predicted']):>10} {r['measured'] / r['predicted']:6.2f}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["70m", "160m"])
    ap.add_argument("--documents", nargs="+", type=int, default=[1000, 10000], help="corpus sizes for `msif attribute --retriever all`")
    ap.add_argument("--fit-examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-candidates", type=int, default=64, help="candidates of the in-process scoring-throughput ratio")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("MSIF_SCALE_DIR", "/tmp/msif-scale")))
    ap.add_argument("--skip-timing", action="store_true", help="memory only (no in-process time ratios)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible")
    results = []
    for shape in a.shapes:
        res = run_shape(shape, a, a.out)
        report(res)
        results.append(res)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
