"""The world's facts: ``(subject, relation, object)`` triples with their QA pair, split and ground truth.

A fact has a stable id such as ``"capital:france"``, a question phrased unlike the pre-training text
and a short answer with a leading space (``"What is the capital of France?"`` / ``" Paris"``). Facts
are split per relation into fine-tuning facts and held-out facts, seeded.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from msif.worldfacts.entities import slug
from msif.worldfacts.templates import RELATIONS


@dataclass
class Fact:
    """One ``(subject, relation, object)`` triple with its QA pair and its ground-truth documents.

    ``answer`` is the object with a leading space (the form the model generates after a prompt).
    ``split`` is ``"finetune"`` (used as QA fine-tuning data) or ``"heldout"`` (never fine-tuned on).
    ``sources`` are the ids of the documents that state the fact; ``hard_negatives`` the ids of
    documents that mention the subject without stating the fact; ``statements`` the sentences used.
    ``test`` is set by the model build: held-out facts the fine-tuned model answers correctly.
    """

    id: str
    relation: str
    subject: str
    object: str
    question: str
    answer: str
    split: str = "finetune"
    sources: list[str] = field(default_factory=list)
    hard_negatives: list[str] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    test: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fact":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def extract_facts(countries: list[dict], cities: list[dict], relations) -> list[Fact]:
    """All clean facts, in a deterministic order (relation, then subject)."""
    facts = []
    for rel in RELATIONS:
        if rel not in relations:
            continue
        spec = RELATIONS[rel]
        rows = (
            [(c["name"], c[rel]) for c in countries]
            if spec["subject"] == "country"
            else [(c["name"], c["country"]) for c in cities]
        )
        for subj, obj in sorted(rows):
            if not obj or obj.lower() in subj.lower():
                continue  # missing, or given away by the subject's name ("South Africa" -> "Africa")
            facts.append(Fact(
                id=f"{rel}:{slug(subj)}",
                relation=rel,
                subject=subj,
                object=obj,
                question=spec["question"].format(s=subj),
                answer=" " + obj,
            ))
    ids = [f.id for f in facts]
    assert len(ids) == len(set(ids)), "fact ids must be unique"
    return facts


def assign_splits(facts: list[Fact], seed: int, finetune_fraction: float) -> None:
    """Split each relation's facts into fine-tuning and held-out facts (seeded per relation)."""
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    for rel, fs in by_rel.items():
        order = list(range(len(fs)))
        random.Random(f"{seed}-split-{rel}").shuffle(order)
        n_ft = int(round(finetune_fraction * len(fs)))
        for rank, i in enumerate(order):
            fs[i].split = "finetune" if rank < n_ft else "heldout"
