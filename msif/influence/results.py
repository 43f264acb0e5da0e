"""What an attribution returns: per query its ranked documents, scores, per-token scores and the shares
of |influence| by role and layer, and the JSON the CLI prints."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .queries import PreparedQuery
from .scoring import LowRank, Split


@dataclass
class Attribution:
    """Result of :meth:`Attributor.attribute`: scores of candidates (corpus rows) for each query."""

    method: str
    queries: list[PreparedQuery]
    rows: list[list[int]]  # per query: candidate corpus rows, best first
    doc_ids: list[list[str]]
    scores: list[list[float]]
    texts: list[list[str]] = field(default_factory=list)
    token_scores: list[list[list[float]]] | None = None  # per query, per candidate, per token
    tokens: list[list[list[str]]] | None = None
    role_share: list[dict[str, float]] | None = None  # per query: share of |influence| by mlp / attention
    layer_share: list[dict[str, float]] | None = None
    dampings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> list[dict]:
        out = []
        for qi, pq in enumerate(self.queries):
            hits = []
            for r in range(len(self.rows[qi])):
                h = {"rank": r + 1, "doc_id": self.doc_ids[qi][r], "row": self.rows[qi][r], "score": self.scores[qi][r]}
                if self.texts:
                    h["text"] = self.texts[qi][r]
                if self.token_scores is not None:
                    h["tokens"] = self.tokens[qi][r]
                    h["token_scores"] = self.token_scores[qi][r]
                hits.append(h)
            d = {"query_id": pq.query.id, "prompt": pq.query.prompt, "answer": pq.answer, "label": pq.label,
                 "generated": pq.generated, "method": self.method, "results": hits, "damping": self.dampings}
            if self.role_share is not None:
                d["role_share"] = self.role_share[qi]
                d["layer_share"] = self.layer_share[qi]
            out.append(d)
        return out


def one_query(U: dict, j: int) -> dict:
    """Query ``j``'s vectors alone (views, no copy)."""
    return {n: LowRank(v.X[j : j + 1], v.Y[j : j + 1]) if isinstance(v, LowRank) else v.rows(j, j + 1) if isinstance(v, Split)
            else v[j : j + 1] for n, v in U.items()}


def query_json(p: PreparedQuery) -> dict:
    return {"id": p.query.id, "prompt": p.prompt_text, "answer": p.answer, "label": p.label}


def role_shares(absm: torch.Tensor, roles: list[str]) -> dict[str, float]:
    """Share of |influence| per role (mlp / attention) from the sums of |per-module score| ``(M,)``."""
    tot = float(absm.sum()) or 1.0
    return {r: float(sum(v for v, x in zip(absm.tolist(), roles) if x == r)) / tot for r in sorted(set(roles))}


def layer_shares(absm: torch.Tensor, modules: list[str], roles: list[str]) -> dict[str, float]:
    """Share of |influence| per (layer, role), e.g. ``{"layer 0 mlp": 0.4, ...}``, from ``absm (M,)``."""
    tot = float(absm.sum()) or 1.0
    out: dict[str, float] = {}
    for name, role, v in zip(modules, roles, absm.tolist()):
        m = re.search(r"\.(\d+)\.", name)
        key = f"layer {m.group(1) if m else '?'} {role}"
        out[key] = out.get(key, 0.0) + v / tot
    return out
