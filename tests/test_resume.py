"""Resumable fits: a fit killed by SIGKILL at a random batch, rerun, equals an uninterrupted one bit for
bit (float64, per-example seeds); a checkpoint of another model, settings or data is refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from msif.curvature import checkpoint as ckpt
from msif.curvature.fit import FitConfig, fit_factors

from helpers import batches, random_lm_examples, sigkill_when, tiny_neox

pytestmark = pytest.mark.usefixtures("one_thread")

N_EX, BS = 24, 3  # 8 batches per pass
CFG = dict(strategy="ekfac", refine=1, samples=2)  # stages: covariance, refine:0, lambda


def _data():
    return batches(random_lm_examples(N_EX, seed=11), BS)


def _model():
    return tiny_neox(seed=5)


class _Slow:
    """Re-iterable batches that take ``delay`` seconds each (so that a kill lands inside a pass)."""

    def __init__(self, data, delay):
        self.data, self.delay = data, delay

    def __iter__(self):
        for b in self.data:
            time.sleep(self.delay)
            yield b


class _Crash:
    """Re-iterable batches that raise after ``n`` batches of the pass ``on_pass`` (0-based)."""

    def __init__(self, data, on_pass, n):
        self.data, self.on_pass, self.n, self.passes = data, on_pass, n, 0

    def __iter__(self):
        p, self.passes = self.passes, self.passes + 1
        for i, b in enumerate(self.data):
            if p == self.on_pass and i == self.n:
                raise KeyboardInterrupt("simulated crash")
            yield b


CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_resume import _Slow, _data, _model, CFG
    from msif.curvature.fit import FitConfig, fit_factors
    fit_factors(_model(), _Slow(_data(), 0.15), FitConfig(**CFG), fingerprint="t", checkpoint={ck!r}, checkpoint_every=1)
    print("finished", flush=True)
    """
)


def _equal(a, b):
    ta, tb = a._tensors(), b._tensors()
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert (a.n_tokens, a.n_examples_cov, a.n_examples_lambda) == (b.n_tokens, b.n_examples_cov, b.n_examples_lambda)


def _state(path: Path):
    try:
        return json.loads((path / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_at_a_random_batch_then_resume_equals_uninterrupted(tmp_path, trial):
    rng = random.Random(1000 + trial)
    stage, batch = rng.randrange(3), rng.randrange(1, N_EX // BS)
    ck = tmp_path / "fit.checkpoint"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent), ck=str(ck))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    reached = lambda: (st := _state(ck)) is not None and (st["stage"], st["batches"]) >= (stage, batch)  # noqa: E731
    sigkill_when(child, reached, "fit")
    killed_at = _state(ck)
    assert killed_at is not None and (killed_at["stage"], killed_at["batches"]) >= (stage, batch)
    assert (killed_at["stage"], killed_at["batches"]) < (3, 0)  # really interrupted, not finished

    resumed = fit_factors(_model(), _data(), FitConfig(**CFG), fingerprint="t", checkpoint=ck, checkpoint_every=1)
    assert resumed.meta.get("resumed")
    whole = fit_factors(_model(), _data(), FitConfig(**CFG), fingerprint="t")
    _equal(resumed, whole)


@pytest.mark.parametrize("on_pass,n", [(0, 5), (1, 2), (2, 7)])
def test_crash_in_every_pass_resumes_to_the_same_factors(tmp_path, on_pass, n):
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        fit_factors(_model(), _Crash(_data(), on_pass, n), FitConfig(**CFG), fingerprint="t", checkpoint=ck, checkpoint_every=2)
    st = _state(ck)
    assert st["stage"] == on_pass and st["batches"] == n - n % 2
    resumed = fit_factors(_model(), _data(), FitConfig(**CFG), fingerprint="t", checkpoint=ck, checkpoint_every=2)
    _equal(resumed, fit_factors(_model(), _data(), FitConfig(**CFG), fingerprint="t"))


def _interrupted(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        fit_factors(_model(), _Crash(_data(), 1, 4), FitConfig(**CFG), fingerprint="t", checkpoint=ck, checkpoint_every=1)
    return ck


def test_changed_settings_model_or_data_are_refused(tmp_path):
    ck = _interrupted(tmp_path)
    with pytest.raises(ckpt.ResumeError, match="seed: 0 → 1.*--restart"):
        fit_factors(_model(), _data(), FitConfig(**CFG, seed=1), fingerprint="t", checkpoint=ck)
    with pytest.raises(ckpt.ResumeError, match="fingerprint"):
        fit_factors(_model(), _data(), FitConfig(**CFG), fingerprint="other", checkpoint=ck)
    other = batches(random_lm_examples(N_EX, seed=12), BS)
    with pytest.raises(ckpt.ResumeError, match="data differ"):
        fit_factors(_model(), other, FitConfig(**CFG), fingerprint="t", checkpoint=ck)
    with pytest.raises(ckpt.ResumeError, match="shorter"):
        fit_factors(_model(), _data()[:2], FitConfig(**CFG), fingerprint="t", checkpoint=ck)
    assert _state(ck)["batches"] == 4  # a refused resume leaves the checkpoint as it was


def test_data_that_change_between_passes_are_an_error():
    class Shuffled:
        def __init__(self):
            self.k = 0

        def __iter__(self):
            self.k += 1
            return iter(batches(random_lm_examples(N_EX, seed=self.k), BS))

    with pytest.raises(Exception, match="same batches every time"):
        fit_factors(_model(), Shuffled(), FitConfig(strategy="ekfac"), fingerprint="t")


def test_cli_resume_refusal_and_restart(tmp_path):
    from test_cli_fit import run

    model = _model()
    model.save_pretrained(tmp_path / "m")
    from helpers import word_tokenizer

    word_tokenizer().save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the capital of france is paris {i}"}) + "\n" for i in range(10)))
    out = tmp_path / "f"
    ck = ckpt.default_path(out)
    # an interrupted fit with seed 0 leaves a checkpoint; the same command with another seed is refused
    from msif import api

    with pytest.raises(KeyboardInterrupt):
        from msif.models.loading import load_model, load_tokenizer

        import msif.curvature.fit as fitmod

        real = fitmod.stream_batch
        calls = {"n": 0}

        def crash(*a, **k):
            calls["n"] += 1
            if calls["n"] > 3:
                raise KeyboardInterrupt
            return real(*a, **k)

        fitmod.stream_batch = crash
        try:
            api.fit(load_model(tmp_path / "m"), str(data), out=out, tokenizer=load_tokenizer(tmp_path / "m"),
                    batch_size=2, checkpoint_every=1, progress=False, model_name=str(tmp_path / "m"))
        finally:
            fitmod.stream_batch = real
    assert (ck / "state.json").exists() and not out.exists()
    code, text = run("fit", tmp_path / "m", data, "--out", out, "--batch-size", 2, "--seed", 1, "--no-progress")
    assert code == 2 and "--restart" in text and "seed" in text and "Traceback" not in text, text
    code, text = run("fit", tmp_path / "m", data, "--out", out, "--batch-size", 2, "--no-progress")
    assert code == 0 and "resumed" in text, text
    assert out.exists() and not ck.exists()
    code, text = run("fit", tmp_path / "m", data, "--out", tmp_path / "g", "--batch-size", 2, "--seed", 1, "--restart", "--no-progress")
    assert code == 0 and "resumed" not in text, text
