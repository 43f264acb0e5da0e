"""The HTML report renders in headless Chromium with the query, answer and top documents on the page."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib

import pytest

from msif.report.console import highlight_segments
from msif.report.html import render_report, write_report

RESULT = {
    "prompt": "What is the capital of France?", "answer": " Paris", "generated": True, "method": "ms-if",
    "damping": {"ft": 1e-3, "pt": 2e-3}, "role_share": {"mlp": 0.7, "attention": 0.3},
    "layer_share": {"layer 0 mlp": 0.4, "layer 1 mlp": 0.3, "layer 0 attention": 0.2, "layer 1 attention": 0.1},
    "gold": ["doc-7"], "expected": " Paris",
    "results": [
        {"rank": 1, "doc_id": "doc-7", "row": 7, "score": 3.5, "tokens": ["In", " France", ",", " the", " capital", " is", " Paris", "."],
         "token_scores": [0.1, 0.5, 0.0, 0.0, 0.4, 0.1, 2.3, 0.1], "text": "In France, the capital is Paris."},
        {"rank": 2, "doc_id": "doc-<b>2</b>", "row": 2, "score": -0.5, "tokens": ["Berlin", " is", " big"],
         "token_scores": [-0.3, -0.1, -0.1], "text": "Berlin is big"},
    ],
}

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def test_report_html_is_self_contained_and_escaped(tmp_path):
    page = render_report([RESULT], title="t")
    assert "What is the capital of France?" in page and "Paris" in page and "doc-7" in page
    assert "doc-&lt;b&gt;2&lt;/b&gt;" in page and "<b>2</b>" not in page  # ids are escaped
    assert "http" not in page.replace("https://arxiv", "")  # no external assets
    assert "states the fact" in page and "mlp 70%" in page
    p = write_report(tmp_path / "r" / "report.html", [RESULT])
    assert p.read_text() == render_report([RESULT], title="msif attribution")
    assert [x.name for x in p.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_highlight_marks_the_top_tokens():
    segs = highlight_segments(RESULT["results"][0]["tokens"], RESULT["results"][0]["token_scores"], n=2)
    hot = [t for t, h in segs if h]
    assert hot == ["France", "Paris"]
    assert "".join(t for t, _ in segs) == "In France, the capital is Paris."


def _png_size_and_variety(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    idat = b"".join(data[i + 8 : i + 8 + struct.unpack(">I", data[i : i + 4])[0]]
                    for i in range(8, len(data)) if data[i + 4 : i + 8] == b"IDAT")
    raw = zlib.decompress(idat)
    return w, h, len(set(raw[: 200_000]))


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MSIF_REQUIRE_CHROMIUM"),
                    reason="needs Debian's chromium (installed by .ci/run, which also makes this test mandatory)")
def test_report_renders_in_headless_chromium(tmp_path):
    assert CHROMIUM is not None, "chromium is not installed: apt-get install chromium"
    p = write_report(tmp_path / "report.html", [RESULT], title="msif demo")
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,900", p.as_uri()], check=True, timeout=120,
                   capture_output=True)
    w, h, variety = _png_size_and_variety(shot)
    assert (w, h) == (1200, 900) and variety > 20  # a real rendering, not a blank page
    dom = subprocess.run([*base, "--dump-dom", p.as_uri()], check=True, timeout=120, capture_output=True, text=True).stdout
    for needle in ("What is the capital of France?", "Paris", "doc-7", "doc-&lt;b&gt;2&lt;/b&gt;", "Most influential pre-training documents"):
        assert needle in dom, needle
