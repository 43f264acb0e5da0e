"""Multi-stage LDS (msif.eval.ms_lds, `msif bench ms-lds`) on the tiny world.

The retraining is the world's own (checked bit for bit), the subsets are what they claim, and each
method's LDS is recomputed here from the returned masks, losses and score matrices by a plain Spearman
correlation; the quick run checks only what holds whatever the model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def world():
    from msif.worldfacts import load_world

    return load_world(size="tiny", progress=False)


def test_pretraining_on_every_document_is_the_worlds_own_bit_for_bit(world):
    from msif.worldfacts.build import pretrain_lm

    model = pretrain_lm(world)
    ref = world.load_pretrained().state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_pretraining_on_a_subset_sees_only_those_documents(world):
    from msif.worldfacts.build import pretrain_lm

    a = pretrain_lm(world, list(range(0, 40)))
    b = pretrain_lm(world, list(range(39, -1, -1)))  # the same rows in another order: the same model
    c = pretrain_lm(world, list(range(1, 41)))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_quick_run(world, tmp_path):
    from scipy.stats import spearmanr
    from typer.testing import CliRunner

    from msif.cli import app
    from msif.eval.ms_lds import METHODS

    r = CliRunner().invoke(app, ["bench", "ms-lds", "--quick", "--subsets", "6", "--json", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert {p.name for p in tmp_path.iterdir()} >= {"ms_lds.json", "ms_lds.md", "ms_lds.png"}
    masks, losses = np.asarray(res["masks"]), np.asarray(res["losses"])
    assert masks.shape == (6, len(world.documents)) and (masks.sum(1) == round(0.5 * len(world.documents))).all()
    assert losses.shape == (6, res["world"]["queries"]) and (losses > 0).all()
    assert set(METHODS) | {"sources"} <= set(res["methods"]) and "ms-if λ=1x" in res["methods"]
    q = 0  # one query's LDS, recomputed from the scores by hand
    for m, r_ in res["methods"].items():
        S = np.asarray(res["scores"][m])
        want = spearmanr(masks @ S[q], -losses[:, q]).statistic
        assert abs(r_["per_query"][q] - (0.0 if np.isnan(want) else want)) < 1e-9, m
        assert -1 <= r_["mean"] <= 1


def test_bad_options_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from msif.cli import app

    for args, msg in ((["--subsets", "2"], "--subsets must be ≥ 3"), (["--fraction", "1"], "--fraction must be"),
                      (["--size", "huge"], "--size must be one of"), (["--damping", "x"], "--damping must be")):
        r = CliRunner().invoke(app, ["bench", "ms-lds", "--quick", "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()
