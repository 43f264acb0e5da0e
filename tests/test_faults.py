"""Faults while writing: `msif attribute --out FILE`, SIGKILL at random points, a full disk.

Whatever happens, an output path holds the previous complete result or the new complete one (or
nothing, when there was none), never part of one; a rerun finishes the work to the same result; the
failures msif expects (no room left) are one line, exit code 2.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_attribute import fitted  # noqa: F401  (fixture)
from test_cli_fit import checkpoint, run  # noqa: F401  (fixture)

from msif.curvature.factors import FactorSet


def _attr(ck: Path, fx: Path, *extra) -> list:
    return ["attribute", "--pretrained", ck / "lm", "--finetuned", ck / "other", "--pretrained-factors", fx / "pt",
            "--finetuned-factors", fx / "ft", "--corpus", ck / "lm.jsonl", "--no-progress",
            "--prompt", "what is the capital of france", "--answer", " paris", *extra]


def _cli(argv, fsize: int | None = None, **kw) -> subprocess.Popen:
    """``python -m msif ARGV`` in a child process; ``fsize``: its file-size limit in bytes (RLIMIT_FSIZE,
    what a full disk looks like to a writer: the write fails with EFBIG; SIGXFSZ is ignored by Python)."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "msif", *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, preexec_fn=limit, **kw)


def _finish(child: subprocess.Popen) -> tuple[int, str]:
    out, _ = child.communicate(timeout=300)
    return child.returncode, out


def _one_error_line(code: int, out: str) -> str:
    """The message of an expected failure: exit 2, exactly one ``error:`` line, no traceback."""
    assert code == 2 and "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    return " ".join(ln.strip() for ln in out[out.index("error:"):].splitlines())


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_attribute_out_writes_the_json_results_and_refuses_to_clobber(checkpoint, fitted, tmp_path):  # noqa: F811
    from test_cli_fit import run_json

    res = tmp_path / "res.json"
    printed = run_json(*_attr(checkpoint, fitted, "--top", 3, "--json", "--out", res))
    assert json.loads(res.read_text()) == printed and len(printed[0]["results"]) == 3
    code, out = run(*_attr(checkpoint, fitted, "--top", 2, "--out", res))  # a second run must not clobber silently
    assert code == 2 and "--overwrite" in out and json.loads(res.read_text()) == printed
    code, out = run(*_attr(checkpoint, fitted, "--out", tmp_path))
    assert code == 2 and "is a folder" in out
    code, out = run(*_attr(checkpoint, fitted, "--top", 2, "--out", res, "--overwrite"))
    assert code == 0 and "rank" in out  # the table still prints
    assert len(json.loads(res.read_text())[0]["results"]) == 2
    assert _hidden(tmp_path) == []  # no lock or temporary left beside it


CHILD_WRITE = """
import sys, time
from pathlib import Path
from msif.atomic import atomic_write
def slow(tmp):
    with open(tmp, "w") as f:
        for i in range(1000):
            f.write("new line %d\\n" % i); f.flush()
            if i == 10:
                print("writing", flush=True)
            time.sleep(0.01)
atomic_write(Path(sys.argv[1]), slow)
"""


def test_a_kill_in_the_middle_of_a_write_keeps_the_previous_file_and_the_leftover_is_swept(tmp_path):
    from helpers import sigkill_when

    from msif.atomic import OutputLock

    path = tmp_path / "res.json"
    path.write_text("previous\n")
    child = subprocess.Popen([sys.executable, "-c", CHILD_WRITE, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tmp = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".res.json.tmp-")]  # noqa: E731
    sigkill_when(child, lambda: bool(tmp()) and tmp()[0].stat().st_size > 100, "atomic write")
    assert path.read_text() == "previous\n" and len(tmp()) == 1  # killed mid-write: the old file, and a leftover
    with OutputLock(path, "msif attribute"):  # the next writer of that file removes it
        pass
    assert path.read_text() == "previous\n" and _hidden(tmp_path) == []


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_of_attribute_out_at_a_random_point_leaves_the_previous_result_then_a_rerun_equals_the_uninterrupted(
        checkpoint, fitted, tmp_path, seed):  # noqa: F811
    ref = tmp_path / "ref.json"
    t0 = time.perf_counter()
    code, out = _finish(_cli(_attr(checkpoint, fitted, "--top", 4, "--out", ref)))
    full = time.perf_counter() - t0
    assert code == 0, out
    res = tmp_path / "res.json"
    res.write_text("[]\n")  # an earlier, complete result
    child = _cli(_attr(checkpoint, fitted, "--top", 4, "--out", res, "--overwrite"))
    time.sleep(random.Random(seed).uniform(0.3, 1.1) * full)  # anywhere from the imports to the final write
    child.kill()
    child.wait(30)
    assert res.read_text() in ("[]\n", ref.read_text())  # the previous file or the new whole one, never part of one
    code, out = _finish(_cli(_attr(checkpoint, fitted, "--top", 4, "--out", res, "--overwrite")))
    assert code == 0, out
    assert res.read_text() == ref.read_text()
    assert _hidden(tmp_path) == []  # the rerun swept what the killed run left (its lock, a temporary)


def test_a_full_disk_fails_cleanly_and_keeps_the_previous_results(checkpoint, fitted, tmp_path):  # noqa: F811
    # fit --overwrite onto factors: the new factor file does not fit; the old factors stay whole
    factors = tmp_path / "pt"
    shutil.copytree(fitted / "pt", factors)
    sha = FactorSet.load(factors).meta["sha256"]
    size = (factors / "factors.safetensors").stat().st_size
    code, out = _finish(_cli(["fit", checkpoint / "lm", checkpoint / "lm.jsonl", "--out", factors, "--overwrite",
                              "--seed", 1, "--no-progress"], fsize=size // 2))
    msg = _one_error_line(code, out)
    assert "free space" in msg and "previous result was kept" in msg, msg
    assert FactorSet.load(factors).meta["sha256"] == sha and _hidden(tmp_path) == []
    # attribute --out: the results file does not fit; the previous one stays
    res = tmp_path / "res.json"
    res.write_text("[]\n")
    code, out = _finish(_cli(_attr(checkpoint, fitted, "--out", res, "--overwrite"), fsize=64))
    assert "free space" in _one_error_line(code, out)
    assert res.read_text() == "[]\n" and _hidden(tmp_path) == []
    # index: the embeddings do not fit; nothing is left that claims to be an index
    code, out = _finish(_cli(["index", checkpoint / "lm.jsonl", "--out", tmp_path / "idx", "--no-progress"], fsize=2048))
    assert "free space" in _one_error_line(code, out)
    assert not (tmp_path / "idx").exists()
    code, out = _finish(_cli(["index", checkpoint / "lm.jsonl", "--out", tmp_path / "idx", "--no-progress"]))
    assert code == 0 and (tmp_path / "idx" / "meta.json").exists(), out  # with room again, the same command finishes


TMPFS_CHILD = """
import json, os, shutil, subprocess, sys
from msif.curvature.factors import FactorSet
disk, factors, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % int(sys.argv[4]), "none", disk], check=True)
shutil.copytree(factors, os.path.join(disk, "pt"))
sha = FactorSet.load(os.path.join(disk, "pt")).meta["sha256"]
r = subprocess.run([sys.executable, "-m", "msif", *argv, "--out", os.path.join(disk, "pt"), "--overwrite"],
                   capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
print(json.dumps({"code": r.returncode, "out": r.stdout + r.stderr, "kept": FactorSet.load(os.path.join(disk, "pt")).meta["sha256"] == sha,
                  "left": sorted(os.listdir(disk))}))
"""


def test_a_really_full_disk_a_small_tmpfs_fails_fit_cleanly(checkpoint, fitted, tmp_path):  # noqa: F811
    """ENOSPC from a real file system (a tmpfs mounted in a user namespace, where the machine allows one)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs in; the file-size-limit test above covers the failure")
    disk = tmp_path / "disk"
    disk.mkdir()
    size = sum(p.stat().st_size for p in (fitted / "pt").iterdir())
    argv = ["fit", str(checkpoint / "lm"), str(checkpoint / "lm.jsonl"), "--seed", "1", "--no-progress"]
    r = subprocess.run(["unshare", "-rm", sys.executable, "-c", TMPFS_CHILD, str(disk), str(fitted / "pt"), json.dumps(argv),
                        str(int(size * 1.5) // 4096 * 4096 + 4096)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    msg = _one_error_line(got["code"], got["out"])
    assert "no space left on device" in msg and "previous result was kept" in msg, msg
    assert got["kept"] and got["left"] == ["pt"], got  # the old factors whole, no temporary or lock beside them
