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
