"""Sentences and their packing into pre-training documents, shared by the standard and hard worlds.

A :class:`Sentence` knows the fact it states (if any) and the entities it refers to; documents are
lists of sentences until :func:`record_documents` turns them into ``{"id", "text", "facts",
"mentions"}`` dicts and fills every fact's ground truth (sources, statements, hard negatives).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from msif.worldfacts.facts import Fact
from msif.worldfacts.templates import (
    BORDER_MENTION,
    CITY_MENTIONS,
    COUNTRY_MENTIONS,
    FILLER_SUBJECTS,
    FILLER_TIMES,
    FILLER_VERBS,
)


@dataclass
class Sentence:
    """One sentence: its text, the entity it is about, the fact it states, the entities it refers to."""

    text: str
    subject: str | None = None
    fact: str | None = None
    mentions: tuple[str, ...] = ()
    indirect: bool = False  # hard world: states its fact by a reference, without the subject's name


def entity_index(countries: list[dict], cities: list[dict]) -> dict[str, tuple[str, dict]]:
    """Entity name -> ``("country" | "city", record)``."""
    entities = {c["name"]: ("country", c) for c in countries}
    entities.update({c["name"]: ("city", c) for c in cities})
    return entities


# ---------------------------------------------------------------------------------------------- sentences


def filler_text(rng: random.Random) -> str:
    """A sentence that names no entity ("The market was busy on Monday.")."""
    return f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} {rng.choice(FILLER_TIMES)}"


def _round_count(n: int) -> str:
    if n >= 1_000_000:
        v = n / 1_000_000
        return f"{v:.0f} million" if v >= 10 else f"{v:.1f} million"
    if n >= 1000:
        return f"{round(n, -3):,}"
    return str(n)


def mention_sentences(entity: dict, kind: str, rng: random.Random, k: int) -> list[Sentence]:
    """Up to ``k`` sentences mentioning ``entity`` (and possibly a neighbour) without stating a fact."""
    name = entity["name"]
    out = []
    if kind == "country":
        pool = [t for t in COUNTRY_MENTIONS
                if not ("{pop}" in t and entity["population"] <= 0) and not ("{area}" in t and entity["area"] <= 0)]
        for t in rng.sample(pool, min(k, len(pool))):
            text = t.format(s=name, pop=_round_count(entity["population"]), area=_round_count(entity["area"]))
            out.append(Sentence(text, name, None, (name,)))
        if entity["borders"] and rng.random() < 0.5:
            n = rng.choice(entity["borders"])
            out.append(Sentence(BORDER_MENTION.format(s=name, n=n), name, None, (name, n)))
    else:
        for t in rng.sample(CITY_MENTIONS, min(k, len(CITY_MENTIONS))):
            out.append(Sentence(t.format(s=name, pop=_round_count(entity["population"])), name, None, (name,)))
    return out


# ---------------------------------------------------------------------------------------------- packing


def distinct_facts(doc: list[Sentence], s: Sentence) -> bool:
    """Whether ``s`` states no fact that ``doc`` already states."""
    return all(t.fact != s.fact for t in doc)


def take_document(pending: list[Sentence], size: int, fits) -> tuple[list[Sentence], list[Sentence]]:
    """One document of at most ``size`` sentences taken greedily from ``pending``: ``(doc, rest)``.
    ``fits(doc, s)`` says whether ``s`` may join ``doc``."""
    doc: list[Sentence] = []
    rest: list[Sentence] = []
    for s in pending:
        (doc if len(doc) < size and fits(doc, s) else rest).append(s)
    return doc, rest


def pack_documents(pending: list[Sentence], rng: random.Random, lo: int, hi: int, fits) -> list[list[Sentence]]:
    """Greedy packing of all of ``pending`` into documents of ``lo``-``hi`` sentences (see :func:`take_document`)."""
    docs = []
    while pending:
        doc, pending = take_document(pending, rng.randint(lo, hi), fits)
        docs.append(doc)
    return docs


def add_filler_and_shuffle(docs: list[list[Sentence]], rng: random.Random, filler_prob: float) -> None:
    """In place: a filler sentence in ``filler_prob`` of the documents, sentences shuffled, documents shuffled."""
    for doc in docs:
        if rng.random() < filler_prob:
            doc.append(Sentence(filler_text(rng)))
        rng.shuffle(doc)
    rng.shuffle(docs)


# ---------------------------------------------------------------------------------------------- ground truth


def record_documents(raw: list[list[Sentence]], facts: list[Fact]) -> list[dict]:
    """Document dicts with ids ``doc-000000`` ... in order; fill every fact's sources and statements,
    and its hard negatives: the documents that mention its subject without stating it."""
    fact_by_id = {f.id: f for f in facts}
    documents = []
    by_entity: dict[str, list[str]] = {}
    for i, doc in enumerate(raw):
        did = f"doc-{i:06d}"
        stated = sorted({s.fact for s in doc if s.fact is not None})
        mentions = sorted({e for s in doc for e in s.mentions})
        documents.append({"id": did, "text": " ".join(s.text for s in doc), "facts": stated, "mentions": mentions})
        for s in doc:
            if s.fact is not None:
                fact_by_id[s.fact].sources.append(did)
                fact_by_id[s.fact].statements.append(s.text)
        for e in mentions:
            by_entity.setdefault(e, []).append(did)
    stated_in = {d["id"]: set(d["facts"]) for d in documents}
    for f in facts:
        f.hard_negatives = [d for d in by_entity.get(f.subject, []) if f.id not in stated_in[d]]
    return documents
