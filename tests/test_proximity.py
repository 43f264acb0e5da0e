"""Weight proximity (msif.eval.proximity, `msif proximity`) against hand computation on tiny saved models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import GPTNeoXForSequenceClassification

from helpers import tiny_neox
from msif.eval.proximity import histogram, markdown, proximity, proximity_from_paths, write_outputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pre-trained causal LM, a fine-tuned copy (every parameter nudged), and a classifier built from it."""
    root = tmp_path_factory.mktemp("prox")
    pt = tiny_neox(seed=0).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh model has zero biases: give every parameter a norm
        for p in pt.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    pt.save_pretrained(root / "pt")
    ft = copy.deepcopy(pt)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(root / "ft")
    clf = GPTNeoXForSequenceClassification.from_pretrained(root / "pt", num_labels=3)
    with torch.no_grad():
        clf.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.add_(0.05)
    clf.save_pretrained(root / "clf")
    return root, pt, ft, clf


@torch.no_grad()
def _by_hand(a: dict, b: dict):
    rows = {}
    for n, x in a.items():
        if n in b and b[n].shape == x.shape:
            d = (b[n].double() - x.double()).flatten()
            rows[n] = (math.sqrt(float(d @ d)), math.sqrt(float(x.double().flatten() @ x.double().flatten())))
    return rows


def test_causal_lm_pair_matches_hand_computation(saved):
    root, pt, ft, _ = saved
    res = proximity_from_paths(str(root / "pt"), str(root / "ft"), alpha=0.3)
    hand = _by_hand(dict(pt.named_parameters()), dict(ft.named_parameters()))
    got = {r["name"]: r for r in res["parameters"]}
    assert set(got) == set(hand) and not res["skipped"]
    for n, (dist, norm) in hand.items():
        assert got[n]["distance"] == pytest.approx(dist, rel=1e-9)
        assert got[n]["norm_pt"] == pytest.approx(norm, rel=1e-9)
        assert got[n]["ratio"] == pytest.approx(dist / norm, rel=1e-9)
        assert got[n]["matrix"] == (dict(pt.named_parameters())[n].dim() == 2)
    sq = sum(d * d for d, _ in hand.values())
    assert res["total"]["squared_distance"] == pytest.approx(sq, rel=1e-9)
    assert res["total"]["proximity_loss"] == pytest.approx(0.15 * sq, rel=1e-9)
    assert res["total"]["relative_distance"] == pytest.approx(math.sqrt(sq / sum(n * n for _, n in hand.values())), rel=1e-9)
    sq_m = sum(hand[n][0] ** 2 for n in hand if got[n]["matrix"])
    assert res["matrices"]["squared_distance"] == pytest.approx(sq_m, rel=1e-9)
    assert res["ratio_stats"]["n"] == sum(r["matrix"] for r in got.values())


def test_classifier_from_causal_lm_skips_the_replaced_head(saved):
    root, pt, _, clf = saved
    res = proximity_from_paths(str(root / "pt"), str(root / "clf"), alpha=2.0)
    skipped = {s["name"]: s["reason"] for s in res["skipped"]}
    head_pt = [n for n, _ in pt.named_parameters() if not n.startswith("gpt_neox.")]
    assert head_pt and all(skipped[n] == "only in the pre-trained model" for n in head_pt)
    assert skipped["score.weight"] == "only in the fine-tuned model"
    got = {r["name"]: r for r in res["parameters"]}
    # only one matrix moved, by 0.05 in every entry
    w = pt.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    moved = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert got[moved]["distance"] == pytest.approx(0.05 * math.sqrt(w.numel()), rel=1e-5)
    assert got[moved]["ratio"] == pytest.approx(got[moved]["distance"] / float(w.double().norm()), rel=1e-9)
    others = [r["distance"] for n, r in got.items() if n != moved]
    assert max(others) == 0.0
    assert res["total"]["squared_distance"] == pytest.approx(0.05 ** 2 * w.numel(), rel=1e-5)
    assert res["total"]["proximity_loss"] == pytest.approx(res["total"]["squared_distance"], rel=1e-12)  # α/2 = 1
    assert res["ratio_stats"]["max_name"] == moved
    assert "score.weight" in markdown(res)


def test_identical_models_and_bad_inputs(saved):
    _, pt, _, _ = saved
    res = proximity(pt, pt, alpha=5.0)
    assert res["total"]["squared_distance"] == 0.0 and res["total"]["proximity_loss"] == 0.0
    assert all(r["ratio"] == 0.0 for r in res["parameters"])
    with pytest.raises(ValueError):
        proximity(pt, pt, alpha=-1.0)
    with pytest.raises(ValueError):
        proximity(pt, torch.nn.Linear(2, 2))


def test_zero_pretrained_parameter_has_no_ratio(tmp_path):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        a.bias.zero_()
        b.weight.copy_(a.weight)
        b.bias.fill_(1.0)
    res = proximity(a, b)
    got = {r["name"]: r for r in res["parameters"]}
    assert got["bias"]["ratio"] is None and got["bias"]["distance"] == pytest.approx(math.sqrt(2))
    assert got["weight"]["ratio"] == 0.0
    json.dumps(res, allow_nan=False)  # strict JSON
    assert histogram(res, tmp_path / "h.png").stat().st_size > 0
    assert "‖θ_pt‖ = 0" in markdown(res)


def test_outputs_and_cli(saved, tmp_path):
    from typer.testing import CliRunner

    from msif.cli import app

    root, _, _, _ = saved
    res = proximity_from_paths(str(root / "pt"), str(root / "ft"))
    paths = write_outputs(res, tmp_path / "lib")
    assert json.loads(paths["json"].read_text())["total"] == res["total"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["proximity", str(root / "pt"), str(root / "clf"), "--alpha", "4", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):])
    assert data["alpha"] == 4.0 and data["total"]["proximity_loss"] == pytest.approx(2 * data["total"]["squared_distance"])
    assert {"score.weight"} <= {s["name"] for s in data["skipped"]}
    assert (out / "proximity.png").is_file() and (out / "proximity.json").is_file() and (out / "proximity.md").is_file()
    r = CliRunner().invoke(app, ["proximity", str(root / "pt"), str(tmp_path / "missing")])
    assert r.exit_code != 0
