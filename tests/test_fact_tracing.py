"""Fact tracing benchmark (msif.eval.fact_tracing, `msif bench fact-tracing`) on the tiny world.

The quick mode runs end to end through the CLI once per module (a couple of minutes on two cores);
the other tests reuse its cached factors and embedding index.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from msif.eval import fact_tracing as ft_mod
from msif.eval.fact_tracing import CLS_METHODS, QA_METHODS, SETTINGS, quick_config, run_fact_tracing


@pytest.fixture(scope="module")
def world():
    from msif.worldfacts import load_world

    return load_world(size="tiny", progress=False)


@pytest.fixture(scope="module")
def quick_run(world, tmp_path_factory):
    from typer.testing import CliRunner

    from msif.cli import app

    out = tmp_path_factory.mktemp("fact-tracing")
    r = CliRunner().invoke(app, ["bench", "fact-tracing", "--quick", "--json", "--out", str(out), "--trials", "2",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    return res, out


def _rows(res, task, setting):
    return [r for r in res["results"] if r["task"] == task and r["setting"] == setting]


def test_quick_mode_end_to_end(quick_run):
    res, out = quick_run
    k = res["config"]["k"]
    metrics = ("mrr", f"recall_any@{k}", f"recall_frac@{k}")
    assert res["world"]["size"] == "tiny" and res["trials"]["n"] == 2
    tasks = {"qa": QA_METHODS, "cls": CLS_METHODS} if res["world"]["classification_queries"] else {"qa": QA_METHODS}
    for task, methods in tasks.items():
        for setting in SETTINGS:
            rows = _rows(res, task, setting)
            assert {r["method"] for r in rows} == set(methods)
            for m in ("ms-if", "ss-if"):
                if m in methods:
                    assert sorted(r["damping"] for r in rows if r["method"] == m) == sorted(res["dampings"])
            for r in rows:
                for mn in metrics:
                    assert 0.0 <= r[mn]["mean"] <= 1.0 and r[mn]["std"] >= 0.0 and len(r[mn]["values"]) == 2
    assert not any(r["method"] == "ss-if" for r in res["results"] if r["task"] == "cls")
    # the gold-in-candidates figure of the nearest-neighbour setting
    cr = res["candidate_recall"]["qa"]
    assert 0.0 <= cr["mean_fraction_of_gold"]["mean"] <= cr["any_gold"]["mean"] <= 1.0
    assert cr["k"] == res["config"]["k_candidates"]
    # dampings are absolute, with their relative equivalents for each factor set
    assert res["dampings"] == list(quick_config().dampings)
    for name in ("pt", "ft"):
        assert res["mean_eigenvalue"][name] > 0
        assert res["relative_dampings"][name][0] == pytest.approx(res["dampings"][0] / res["mean_eigenvalue"][name])
    assert set(res["verdict"]) >= {"qa/knn", "qa/pool"}
    assert res["timings_s"]["total"] > 0
    # files
    assert json.loads((out / "fact_tracing.json").read_text())["results"] == res["results"]
    md = (out / "fact_tracing.md").read_text()
    assert "| method | λ | MRR |" in md and "chance (expected)" in md and "nearest neighbours" in md
    assert (out / "fact_tracing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "cache").is_dir()


def test_lexical_baseline_beats_chance_and_random_control_is_at_chance(quick_run):
    res, _ = quick_run
    for setting in SETTINGS:
        chance = [c for c in res["chance"] if c["task"] == "qa" and c["setting"] == setting][0]["mrr"]["mean"]
        by = {r["method"]: r for r in _rows(res, "qa", setting)}
        # the test questions name the subject and the answer: BM25 must find the sources
        assert by["bm25"]["mrr"]["mean"] > chance + 0.3
        assert 0.0 < chance < 0.5


def test_random_scores_drop_to_chance(quick_run):
    """With every method's scores replaced by random ones, MRR falls to the analytic chance level."""
    res0, out = quick_run
    rng = np.random.default_rng(0)

    def hook(task, setting, method, scores, query):
        return rng.standard_normal(len(scores))

    res = run_fact_tracing(quick_config(trials=1, classification=False), cache_dir=out / "cache", progress=False,
                           score_hook=hook)
    for setting in SETTINGS:
        chance = [c for c in res["chance"] if c["task"] == "qa" and c["setting"] == setting][0]["mrr"]["mean"]
        mrrs = np.array([r["mrr"]["mean"] for r in _rows(res, "qa", setting)])
        assert len(mrrs) >= 10
        assert abs(mrrs.mean() - chance) < 0.08, (setting, mrrs, chance)
        assert np.all(np.abs(mrrs - chance) < 0.3)
        real_bm25 = [r for r in _rows(res0, "qa", setting) if r["method"] == "bm25"][0]["mrr"]["mean"]
        fake_bm25 = [r for r in _rows(res, "qa", setting) if r["method"] == "bm25"][0]["mrr"]["mean"]
        assert fake_bm25 < real_bm25 - 0.2


def test_per_query_candidate_pass_matches_attributor_scores(world, quick_run):
    """The benchmark's pass (stacked variants per query, each query contracted with its own candidates
    only) gives the library's scores (Attributor.score over that query's candidates) for each method."""
    from msif.curvature.factors import FactorSet
    from msif.influence.attribute import Attributor, Query
    from msif.models.loading import load_model, load_tokenizer

    _, out = quick_run
    fdir = out / "cache" / f"world-{world.meta['hash']}" / "factors"
    pt = load_model(str(world.pretrained_dir))
    ft = load_model(str(world.finetuned_dir))
    tok = load_tokenizer(str(world.pretrained_dir))
    lam = 1e-5
    att = Attributor(pt, ft, tok, FactorSet.load(fdir / "pt-seed0"), FactorSet.load(fdir / "ft-seed0"),
                     damping_pt=lam, damping_ft=lam)
    facts = world.test_facts[:2]
    prep = att.prepare([Query(world.qa_prompt(f.question), f.answer) for f in facts])
    texts = [d["text"] for d in world.documents]
    rows_of = [np.arange(5, 45), np.arange(30, 61)[::-1].copy()]  # overlapping, of different sizes, one reversed
    names = [tm.name for tm in att.shared]
    g = att.query_gradients(prep)
    u_ft = att.query_vectors(g, "ss-if")
    u_ms = att.pt_factors.precondition(u_ft, lam)
    ref_ms = att.query_vectors(g, "ms-if")
    for n in names:  # two float32 routes (fused basis change, factored gradients) through a 1e-5-damped inverse
        assert float((u_ms[n] - ref_ms[n]).norm() / ref_ms[n].norm()) < 1e-3
    enc = att.encode_candidates(texts, range(len(texts)))
    stacked = ft_mod._stacked([u_ms, g], len(facts))  # per query: [ms-if, gdp], both scored on θ_pt
    got_pt = ft_mod._score_stage(att, stacked, "ms-if", rows_of, 2, enc)
    got_ft = ft_mod._score_stage(att, ft_mod._stacked([u_ft], len(facts)), "ss-if", rows_of, 1, enc)
    for method, got, v in (("ms-if", got_pt, 0), ("gdp", got_pt, 1), ("ss-if", got_ft, 0)):
        for i in range(len(facts)):
            ref = att.score(prep[i : i + 1], [texts[r] for r in rows_of[i]], rows_of[i], method=method).scores.numpy()[0]
            assert got[i].shape == (2 if method != "ss-if" else 1, len(rows_of[i]))
            scale = np.abs(ref).max()
            np.testing.assert_allclose(got[i][v], ref, rtol=0, atol=1e-3 * scale)
