"""Two processes on CPU (gloo) through torchrun: a 2-rank fit equals a 1-rank fit, 2-rank attribution and
index equal 1-rank ones, a rank killed mid-fit stops the run and a rerun resumes to the same factors, and
a collective whose peer is gone fails with a message naming the rank instead of hanging."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from msif.curvature.factors import FactorSet

from test_cli_fit import SENTENCES, checkpoint, run  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    env.pop("CI", None)
    return env


def torchrun(*args, nproc: int = 2, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m msif ARGS`` (output: stdout + stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "msif",
           *[str(a) for a in args]]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, **popen)


def _tensors_close(a: FactorSet, b: FactorSet, rtol: float):
    """The same factors: covariance sums and eigenvalues to ``rtol``; eigenvectors and Λ (which depend on
    the basis chosen inside a degenerate eigenspace, e.g. a rank-deficient ``A``'s null space) through
    what they are for, the damped inverse applied to random gradients, to ``100 · rtol``."""
    ta, tb = a._tensors(), b._tensors()
    assert set(ta) == set(tb)
    for k in ta:
        if k.split("/")[0] in ("A_sum", "S_sum", "eigA", "eigS"):
            x, y = ta[k].double(), tb[k].double()
            assert float((x - y).abs().max()) <= rtol * (float(y.abs().max()) or 1.0), k
    g = torch.Generator().manual_seed(0)
    grads = {m: torch.randn(3, tm.out_features, tm.in_dim, generator=g, dtype=torch.float64) for m, tm in a.modules.items()}
    pa, pb = a.precondition(grads, 1e-3, torch.float64), b.precondition(grads, 1e-3, torch.float64)
    for m in grads:
        assert float((pa[m] - pb[m]).abs().max()) <= 100 * rtol * float(pb[m].abs().max()), m


@pytest.fixture(scope="module")
def corpus(checkpoint, tmp_path_factory):  # noqa: F811
    """40 documents over the fixture's vocabulary (batch size 1: 40 batches, 20 per rank)."""
    words = " ".join(SENTENCES).split()
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    p.write_text("".join(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))}) + "\n"
                         for i in range(40)))
    return p


FIT = ("--batch-size", 1, "--stats-dtype", "float64", "--factor-dtype", "float64", "--refine-basis", 1, "--no-progress")


@pytest.fixture(scope="module")
def one_rank_factors(checkpoint, corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("f1") / "f"
    code, text = run("fit", checkpoint / "lm", corpus, "--out", out, *FIT)
    assert code == 0, text
    return FactorSet.load(out)


def test_two_rank_fit_equals_one_rank(checkpoint, corpus, one_rank_factors, tmp_path):  # noqa: F811
    r = torchrun("fit", checkpoint / "lm", corpus, "--out", tmp_path / "f", "--checkpoint-every", 3, *FIT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("fitted") == 1  # rank 0 reports, once
    fs = FactorSet.load(tmp_path / "f")
    assert fs.meta["world_size"] == 2
    assert fs.n_examples_cov == fs.n_examples_lambda == one_rank_factors.n_examples_cov == 40
    assert fs.n_tokens == one_rank_factors.n_tokens
    _tensors_close(fs, one_rank_factors, 1e-10)
    assert not (tmp_path / "f.checkpoint").exists()


def test_rank_killed_mid_fit_stops_the_run_and_a_rerun_resumes(checkpoint, corpus, one_rank_factors, tmp_path):  # noqa: F811
    out = tmp_path / "f"
    args = ["fit", checkpoint / "lm", corpus, "--out", out, "--checkpoint-every", 1, *FIT]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "msif", *map(str, args)]
    proc = subprocess.Popen(cmd, env=_env(MSIF_DIST_TIMEOUT="60"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    state = out.with_name("f.checkpoint") / "state.json"
    kill_at = random.Random().randint(2, 30)  # batches done in the first pass
    t0 = time.time()
    killed = None
    while time.time() - t0 < 120 and proc.poll() is None:
        try:
            st = json.loads(state.read_text())
        except (OSError, ValueError):
            st = None
        if st is not None and (st["stage"] > 0 or st["batches"] >= kill_at):
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if len(workers) == 2:
                killed = int(workers[-1])
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=120)
    assert killed is not None, "the fit ended before a rank could be killed:\n" + output
    assert proc.returncode != 0
    assert "SIGKILL" in output or "Signal 9" in output or "exitcode" in output, output
    assert not out.exists() and state.exists()
    r = torchrun(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed" in r.stdout + r.stderr
    _tensors_close(FactorSet.load(out), one_rank_factors, 1e-10)


def _attr(checkpoint, *extra):  # noqa: F811
    return ("attribute", "--pretrained", checkpoint / "lm", "--finetuned", checkpoint / "other",
            "--pretrained-factors", checkpoint.parent / "dist-factors" / "pt", "--finetuned-factors",
            checkpoint.parent / "dist-factors" / "ft", *extra)


@pytest.fixture(scope="module")
def attr_factors(checkpoint):  # noqa: F811
    d = checkpoint.parent / "dist-factors"
    if not (d / "pt").exists():
        assert run("fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", d / "pt", "--no-progress")[0] == 0
        assert run("fit", checkpoint / "other", checkpoint / "qa.jsonl", "--out", d / "ft", "--objective", "answer",
                   "--no-progress")[0] == 0
    return d


def test_two_rank_attribution_equals_one_rank(checkpoint, corpus, attr_factors, tmp_path):  # noqa: F811
    qf = tmp_path / "q.jsonl"
    qf.write_text(json.dumps({"id": "q1", "prompt": "berlin is in", "answer": " germany"}) + "\n"
                  + json.dumps({"id": "q2", "prompt": "what is the capital of france", "answer": " paris"}) + "\n")
    common = ("--corpus", corpus, "--queries", qf, "--retriever", "all", "--chunk-size", 3, "--top", 7, "--json", "--no-progress")
    code, text = run(*_attr(checkpoint, *common, "--scores-out", tmp_path / "s1"))
    assert code == 0, text
    one = json.loads(text[text.index("["):])
    r = torchrun(*_attr(checkpoint, *common, "--scores-out", tmp_path / "s2"))
    assert r.returncode == 0, r.stderr
    two = json.loads(r.stdout)  # rank 0 alone prints
    assert len(two) == len(one) == 2
    for a, b in zip(one, two):
        assert [h["doc_id"] for h in a["results"]] == [h["doc_id"] for h in b["results"]]
        for ha, hb in zip(a["results"], b["results"]):
            assert abs(ha["score"] - hb["score"]) <= 1e-8 * max(1.0, abs(ha["score"]))
            assert ha["token_scores"] == pytest.approx(hb["token_scores"], rel=1e-8, abs=1e-10)
        assert a["role_share"] == pytest.approx(b["role_share"], rel=1e-8)
    m1 = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    assert m1["shards"] == m2["shards"] and len(m2["shards"]) == 14  # 40 documents in chunks of 3, from both ranks
    from safetensors.torch import load_file

    for name in m1["shards"]:
        x, y = load_file(str(tmp_path / "s1" / name)), load_file(str(tmp_path / "s2" / name))
        assert torch.equal(x["rows"], y["rows"])
        torch.testing.assert_close(x["scores"], y["scores"], rtol=1e-6, atol=1e-6)


def test_two_rank_index_equals_one_rank(corpus, tmp_path):
    code, text = run("index", corpus, "--out", tmp_path / "i1", "--batch-size", 4, "--no-progress")
    assert code == 0, text
    r = torchrun("index", corpus, "--out", tmp_path / "i2", "--batch-size", 4, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("indexed") == 1
    import faiss
    import numpy as np

    a, b = (faiss.read_index(str(tmp_path / d / "index.faiss")) for d in ("i1", "i2"))
    assert a.ntotal == b.ntotal == 40
    np.testing.assert_array_equal(a.reconstruct_n(0, 40), b.reconstruct_n(0, 40))
    assert (tmp_path / "i1" / "doc_ids.parquet").read_bytes() == (tmp_path / "i2" / "doc_ids.parquet").read_bytes()


WORKER = textwrap.dedent(
    """
    import os, sys, torch
    from msif.distributed import DistributedError, broken, exit_now, init, reduce_sums
    w, _ = init("cpu")
    if w.rank == 1:
        os._exit(0)  # gone without a word, before the collective
    try:
        reduce_sums({"x": torch.ones(3)}, {"examples": 1}, "summing the test's sums")
    except DistributedError as e:
        print("CAUGHT", e, "broken:", broken(), flush=True)
        exit_now(3)  # as the CLI does: the group's destructors would abort with the peer gone
    print("NO ERROR", flush=True)
    """
)


def test_a_collective_without_its_peer_fails_naming_the_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), MSIF_DIST_TIMEOUT="20"))
             for r in range(2)]
    out0, _ = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    assert procs[0].returncode == 3, out0
    assert "CAUGHT rank 0 of 2: summing the test's sums failed" in out0
    assert "rerunning the same command resumes" in out0 and "broken: True" in out0


def test_fsdp_two_rank_fit_equals_one_rank(checkpoint, corpus, one_rank_factors, tmp_path):  # noqa: F811
    """The weights sharded across the ranks (FSDP2 on gloo): the layers' inputs and output gradients are
    whole, so the factors are the same (in float64: float32 products of gathered weights round
    differently, 1e-9 relative)."""
    code, text = run("fit", checkpoint / "lm", corpus, "--out", tmp_path / "one", "--dtype", "float64", "--max-examples", 39, *FIT)
    assert code == 0, text
    # 39 documents: the last round gives rank 1 no batch (it must still take part in the all-gathers);
    # checkpoints every 5 batches fall between rounds
    r = torchrun("fit", checkpoint / "lm", corpus, "--out", tmp_path / "f", "--fsdp", "--dtype", "float64",
                 "--max-examples", 39, "--checkpoint-every", 5, *FIT)
    assert r.returncode == 0, r.stdout + r.stderr
    fs = FactorSet.load(tmp_path / "f")
    assert fs.meta["fingerprint"] == one_rank_factors.meta["fingerprint"]  # of the whole weights, not the shards
    assert fs.n_examples_cov == fs.n_examples_lambda == 39
    _tensors_close(fs, FactorSet.load(tmp_path / "one"), 1e-10)


def test_fsdp_without_torchrun_is_one_clear_line(checkpoint, corpus, tmp_path):  # noqa: F811
    code, text = run("fit", checkpoint / "lm", corpus, "--out", tmp_path / "f", "--fsdp", "--no-progress")
    assert code == 2 and "launch with torchrun" in text and "Traceback" not in text


def test_buckets_split_by_size_and_dtype(monkeypatch):
    """The flat buffers of reductions and broadcasts: consecutive keys, one dtype each, at most
    BUCKET_ELEMS elements unless a single tensor is larger (it then goes alone)."""
    import msif.distributed as D

    monkeypatch.setattr(D, "BUCKET_ELEMS", 10)
    keys = [("a", (2, 3), "float32"), ("b", (4,), "float32"), ("c", (2,), "float32"), ("d", (3,), "float64"),
            ("e", (20,), "float64"), ("f", (1,), "float64")]
    assert [[k for k, _, _ in b] for b in D._buckets(keys)] == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
