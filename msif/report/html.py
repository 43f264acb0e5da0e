"""A self-contained HTML report of an attribution (no external assets, opens in any browser)."""

from __future__ import annotations

import html
import os
from pathlib import Path

from ..atomic import atomic_write_text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem}
.meta{color:#5b6472;font-size:.9rem}
.qa{background:#f4f6fb;border-radius:8px;padding:1rem 1.2rem;margin:1rem 0}
.qa b{display:inline-block;min-width:5.5rem;color:#5b6472}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{border-bottom:1px solid #e3e6ee;padding:.45rem .5rem;vertical-align:top;text-align:left}
th{background:#f4f6fb}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.doc{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.82rem;white-space:pre-wrap;word-break:break-word}
.tag{display:inline-block;border-radius:4px;padding:0 .35rem;font-size:.75rem;margin-left:.3rem}
.src{background:#d8f5dd;color:#16692b} .neg{background:#fde3e3;color:#8a1f1f}
.bar{display:flex;height:22px;border-radius:5px;overflow:hidden;margin:.4rem 0;max-width:520px}
.bar div{color:#fff;font-size:.75rem;padding-left:.4rem;line-height:22px;white-space:nowrap}
.mlp{background:#3867d6} .attention{background:#e17b27}
.legend span{margin-right:1rem;font-size:.85rem}
"""


def _token_html(tokens: list[str], scores: list[float]) -> str:
    """Tokens with a background whose intensity follows the token's share of the score (green: raises
    the answer's probability, red: lowers it)."""
    m = max((abs(s) for s in scores), default=0.0) or 1.0
    out = []
    for t, s in zip(tokens, scores):
        a = min(1.0, abs(s) / m)
        colour = f"rgba(34,160,70,{a:.2f})" if s > 0 else f"rgba(215,50,50,{a:.2f})"
        out.append(f'<span style="background:{colour}" title="{s:.3g}">{html.escape(t)}</span>')
    return "".join(out)


def _bar(shares: dict[str, float]) -> str:
    parts = []
    for role, v in sorted(shares.items()):
        parts.append(f'<div class="{html.escape(role)}" style="width:{max(v, 0.0) * 100:.1f}%">{html.escape(role)} {v:.0%}</div>')
    return f'<div class="bar">{"".join(parts)}</div>'


def render_report(results: list[dict], title: str = "msif attribution", notes: dict | None = None) -> str:
    """HTML for :meth:`msif.influence.attribute.Attribution.to_json` output (optionally enriched with
    ``gold`` (set of source doc ids) and ``expected`` per query, and ``notes`` shown as metadata)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        body.append('<p class="meta">' + " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in notes.items()) + "</p>")
    for r in results:
        ans = r.get("answer")
        what = f"class {r['label']}" + (f" ({html.escape(str(r['label_name']))})" if r.get("label_name") else "") if r.get("label") is not None else html.escape(str(ans))
        gen = " <span class='meta'>(greedy-decoded by the fine-tuned model)</span>" if r.get("generated") else ""
        body.append('<div class="qa">')
        body.append(f"<div><b>Question</b> {html.escape(r['prompt'])}</div>")
        body.append(f"<div><b>Answer</b> {what}{gen}</div>")
        if r.get("expected"):
            body.append(f"<div><b>Expected</b> {html.escape(str(r['expected']))}</div>")
        body.append(f"<div><b>Method</b> {html.escape(r['method'])}"
                    + (f" · damping {', '.join(f'{k} {v:.3g}' for k, v in r['damping'].items())}" if r.get("damping") else "") + "</div>")
        body.append("</div>")
        if r.get("role_share"):
            body.append("<h2>Where the influence sits</h2>")
            body.append("<p class='meta'>Share of the total |influence| of the candidates carried by MLP and attention blocks.</p>")
            body.append(_bar(r["role_share"]))
            if r.get("layer_share"):
                body.append('<p class="legend">' + "".join(f"<span>{html.escape(k)}: {v:.1%}</span>" for k, v in sorted(r["layer_share"].items())) + "</p>")
        body.append("<h2>Most influential pre-training documents</h2>")
        body.append("<table><tr><th>#</th><th>document</th><th>score</th><th>text (token colour: contribution to the score)</th></tr>")
        gold = set(r.get("gold") or [])
        negs = set(r.get("hard_negatives") or [])
        for h in r["results"]:
            tag = ""
            if h["doc_id"] in gold:
                tag = '<span class="tag src">states the fact</span>'
            elif h["doc_id"] in negs:
                tag = '<span class="tag neg">mentions subject only</span>'
            text = _token_html(h["tokens"], h["token_scores"]) if "tokens" in h else html.escape(h.get("text", ""))
            body.append(f"<tr><td class='num'>{h['rank']}</td><td>{html.escape(str(h['doc_id']))}{tag}</td>"
                        f"<td class='num'>{h['score']:.4g}</td><td class='doc'>{text}</td></tr>")
        body.append("</table>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def write_report(path: str | os.PathLike, results: list[dict], **kw) -> Path:
    """Write :func:`render_report` atomically to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, render_report(results, **kw))
