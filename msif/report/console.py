"""Terminal output of attributions: rich tables with the most influential tokens highlighted."""

from __future__ import annotations

from rich.console import Console


def highlight_segments(tokens: list[str], scores: list[float], n: int = 3, width: int = 220) -> list[tuple[str, bool]]:
    """A snippet around the most influential token: ``(text, is_top)`` pieces, the top ``n`` positive
    tokens flagged (leading "…"/trailing "…" pieces when the document is cut)."""
    if not tokens:
        return []
    top = {i for i in sorted(range(len(scores)), key=lambda i: -scores[i])[:n] if scores[i] > 0}
    centre = max(range(len(scores)), key=lambda i: scores[i])
    lo = hi = centre
    length = len(tokens[centre])
    while length < width and (lo > 0 or hi < len(tokens) - 1):
        if hi < len(tokens) - 1:
            hi += 1
            length += len(tokens[hi])
        if lo > 0 and length < width:
            lo -= 1
            length += len(tokens[lo])
    out = [("…", False)] if lo > 0 else []
    for i in range(lo, hi + 1):
        t = tokens[i].replace("\n", " ")
        if i in top:
            lead = t[: len(t) - len(t.lstrip())]
            if lead:
                out.append((lead, False))
            out.append((t.strip(), True))
        else:
            out.append((t, False))
    if hi < len(tokens) - 1:
        out.append(("…", False))
    return out


def printable(text: str) -> str:
    """``text`` with control characters (ANSI / OSC escapes, C1 codes, carriage returns…) shown as
    ``\\x1b``-style escapes, so that a corpus cannot recolour, retitle or clear the terminal."""
    return "".join(c if c.isprintable() or c in " \t" else c.encode("unicode_escape").decode("ascii") for c in text)


def print_results(results: list[dict]) -> None:
    """Print attribution results (:meth:`Attribution.to_json` shape) as rich tables."""
    from rich.table import Table
    from rich.text import Text

    out = Console(soft_wrap=False)
    for r in results:
        what = f"label {r['label']}" if r.get("label") is not None else repr(r.get("answer"))
        gen = " (generated)" if r.get("generated") else ""
        title = printable(f"{r['method']}: {r['prompt']!r} → {what}{gen}")
        t = Table(title=Text(title), show_lines=False, expand=False)
        t.add_column("rank", justify="right")
        t.add_column("document", overflow="fold")
        t.add_column("score", justify="right")
        t.add_column("snippet (most influential tokens highlighted)", overflow="fold")
        gold = set(r.get("gold") or [])
        for h in r["results"]:
            snip = Text()
            if "tokens" in h:
                for piece, hot in highlight_segments(h["tokens"], h["token_scores"]):
                    snip.append(printable(piece), style="bold magenta underline" if hot else None)
            else:
                snip.append(printable((h.get("text") or "")[:220]))
            doc = Text(printable(str(h["doc_id"])))
            if h["doc_id"] in gold:
                doc.append(" ✓ states the fact", style="green")
            t.add_row(str(h["rank"]), doc, f"{h['score']:.4g}", snip)
        out.print(t)
        if r.get("role_share"):
            out.print("share of |influence|: " + ", ".join(f"{k} {v:.1%}" for k, v in r["role_share"].items()))
