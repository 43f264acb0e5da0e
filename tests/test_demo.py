"""`msif demo` end to end on the tiny bundled world (the README's first command runs the full one)."""

from __future__ import annotations

import json

from msif.demo import run_demo


def test_demo_on_tiny_world(tmp_path):
    res = run_demo(out=tmp_path / "demo", size="tiny", top=3, candidates=20, progress=False, quiet=True)
    assert res["generated"] and res["answer"].strip()
    assert len(res["results"]) == 3 and res["candidates"] == 20
    scores = [h["score"] for h in res["results"]]
    assert scores == sorted(scores, reverse=True)
    assert set(res["role_share"]) == {"mlp", "attention"} and abs(sum(res["role_share"].values()) - 1) < 1e-9
    page = (tmp_path / "demo" / "report.html").read_text()
    assert res["prompt"] in page and res["results"][0]["doc_id"] in page
    assert json.loads((tmp_path / "demo" / "result.json").read_text())["results"] == res["results"]
    if "gold" in res:  # the question is a known fact: its recorded sources are marked in the report
        assert res["gold_in_candidates"] >= 0 and ("states the fact" in page) == any(h["doc_id"] in res["gold"] for h in res["results"])


def test_demo_on_your_own_models(tmp_path):
    """The same pipeline on models and files given by path (here: the tiny world's, as a user would)."""
    from typer.testing import CliRunner

    from msif.cli import app
    from msif.worldfacts import load_world

    w = load_world(size="tiny", progress=False)
    q = w.test_facts[0].question
    args = ["demo", "--pretrained", str(w.pretrained_dir), "--finetuned", str(w.finetuned_dir), "--corpus", str(w.corpus_path),
            "--finetune-data", str(w.qa_finetune_path), "--question", w.qa_prompt(q), "--out", str(tmp_path / "own"),
            "--top", "2", "--candidates", "10", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "own" / "result.json").read_text())
    assert len(res["results"]) == 2 and res["answer"].strip()
    assert (tmp_path / "own" / "cache" / "factors-pt" / "factors.json").exists()
    r = CliRunner().invoke(app, ["demo", "--pretrained", str(w.pretrained_dir), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "together" in r.output
