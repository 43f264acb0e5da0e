"""Tests of the hard fact-tracing world (msif.worldfacts.hard, ``msif bench fact-tracing --world hard``).

The ground truth is checked by logic of these tests' own (word matching on the documents' text and
on the questions), not by the generator's bookkeeping: a source must contain its fact's object and a
reference to its subject in one sentence without a negation; a hard negative must not. Also: the
standard world is exactly as it was before the hard world existed, and a tiny hard world builds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest

from msif.worldfacts import build as wb
from msif.worldfacts import hard
from msif.worldfacts.corpus import RELATIONS, build_corpus

#: world_hash(size, seed=0) and a digest of the standard corpus, recorded before the hard world was added.
STANDARD_HASHES = {"full": "374498e5ddb1", "tiny": "fd49a0098863"}
STANDARD_DIGESTS = {"full": "8523c37bef4ed89c", "tiny": "53cd364c0ceeafc4"}
#: The design's share of source documents without the subject's name (module docstring of hard.py),
#: over the facts whose subject has a usable reference, must be at least this in the whole world.
SHARE_FLOOR = {"full": 0.33, "tiny": 0.5}

STOP = {"what", "is", "the", "of", "on", "which", "do", "you", "a", "from", "in"}
NEGATION = re.compile(r"\b(?:not|never|no)\b", re.IGNORECASE)


def has_word(text: str, phrase: str) -> bool:
    return re.search(r"(?<![A-Za-z])" + re.escape(phrase.lower()) + r"(?![A-Za-z])", text.lower()) is not None


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - {"the", "of", "and", "a", "an"}


def question_stems(fact) -> set[str]:
    """First five letters of the question's content words (its subject and function words removed)."""
    return {w[:5] for w in words(fact.question.replace(fact.subject, "")) - STOP}


def has_question_word(text: str, fact) -> bool:
    return any(w.startswith(s) for w in re.findall(r"[a-z]+", text.lower()) for s in question_stems(fact))


def references(corpus_refs: dict, fact) -> list[str]:
    """How a sentence may refer to the fact's subject: its name, or a recorded reference that does not
    contain a word of the object (such a reference cannot state the fact)."""
    return [fact.subject] + [r for r in corpus_refs.get(fact.subject, []) if not words(r) & words(fact.object)]


def states(sentence: str, fact, corpus_refs: dict, longer: tuple = ()) -> bool:
    """Whether ``sentence`` states ``fact``: a reference to its subject and its object, no negation.
    ``longer``: names and answers that contain the object or the subject's name ("Brazilian real" holds
    "Brazilian", the city "Santo Domingo Oeste" the capital "Santo Domingo", "South Sudan" "Sudan"); the
    object or the name inside one of them does not count."""
    sentence = mask(sentence, longer)
    return (not NEGATION.search(sentence) and has_word(sentence, fact.object)
            and any(has_word(sentence, r) for r in references(corpus_refs, fact)))


def mask(sentence: str, phrases) -> str:
    for p in phrases:
        sentence = re.sub(re.escape(p), " ", sentence, flags=re.IGNORECASE)
    return sentence


def longer_names(corpus) -> dict:
    """fact id -> the world's names, answers and references that contain its object or its subject's
    name as words (longest first)."""
    lexicon = {p for f in corpus.facts for p in (f.subject, f.object)}
    lexicon = sorted(lexicon | {r for v in corpus.references.values() for r in v}, key=len, reverse=True)

    def holds(p, f):
        return any(t.lower() in p.lower() and has_word(p, t) for t in (f.object, f.subject))

    return {f.id: tuple(p for p in lexicon if p not in (f.object, f.subject) and holds(p, f)) for f in corpus.facts}


def splitter(corpus):
    """Sentence splitter that keeps names with full stops ("St. John's", "U.S. Virgin Islands") whole."""
    dotted = {p for f in corpus.facts for p in (f.subject, f.object) if "." in p}
    dotted |= {r for refs in corpus.references.values() for r in refs if "." in r}

    def split(text: str) -> list[str]:
        for p in sorted(dotted, key=len, reverse=True):
            text = text.replace(p, p.replace(".", "\0"))
        return [s.replace("\0", ".") for s in re.split(r"(?<=[.!?]) (?=[A-Z])", text)]

    return split


def hard_corpus(size: str, seed: int = 0):
    return build_corpus(seed, wb.world_config(size, "hard").corpus)


@pytest.fixture(scope="module")
def tiny():
    return hard_corpus("tiny")


@pytest.fixture(scope="module")
def full():
    return hard_corpus("full")


# ------------------------------------------------------------------------------------ the standard world


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_standard_world_unchanged(size):
    assert wb.world_hash(size, 0) == STANDARD_HASHES[size]
    assert wb.world_hash(size, 0, world="standard") == STANDARD_HASHES[size]
    assert wb.world_config(size, "standard") is wb.SIZES[size]
    assert "style" not in wb.config_record(wb.SIZES[size])["corpus"]
    c = build_corpus(0, wb.SIZES[size].corpus)
    blob = json.dumps({"docs": c.documents, "facts": [f.to_dict() for f in c.facts], "stats": c.stats()},
                      sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == STANDARD_DIGESTS[size], (
        "the standard corpus changed: if on purpose, bump BUILD_VERSION and record the new hashes here")
    assert not c.references


def test_hard_world_has_its_own_hash_and_config():
    for size in ("tiny", "full"):
        cfg = wb.world_config(size, "hard")
        assert cfg.corpus.style == "hard" and wb.config_record(cfg)["corpus"]["style"] == "hard"
        assert wb.world_hash(size, 0, world="hard") not in STANDARD_HASHES.values()
        assert wb.world_hash(size, 0, world="hard") == wb.world_hash(size, 0, config=cfg)
        assert wb.world_dir(size, 0, "/x", world="hard") != wb.world_dir(size, 0, "/x")
    with pytest.raises(ValueError, match="unknown world"):
        wb.world_config("tiny", "medium")
    with pytest.raises(ValueError, match="unknown world"):
        wb.load_world(size="tiny", world="medium", cache_dir="/nonexistent")


def test_same_facts_questions_and_splits_as_standard(tiny):
    std = build_corpus(0, wb.SIZES["tiny"].corpus)
    key = [(f.id, f.question, f.answer, f.split) for f in std.facts]
    assert [(f.id, f.question, f.answer, f.split) for f in tiny.facts] == key


def test_deterministic(tiny):
    again = hard_corpus("tiny")
    assert again.documents == tiny.documents and again.references == tiny.references
    assert [f.to_dict() for f in again.facts] == [f.to_dict() for f in tiny.facts]
    other = hard_corpus("tiny", seed=1)
    assert [d["text"] for d in other.documents] != [d["text"] for d in tiny.documents]


# ------------------------------------------------------------------------------------ ground truth


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_sources_state_their_fact(which, request):
    c = request.getfixturevalue(which)
    docs = {d["id"]: d for d in c.documents}
    split = splitter(c)
    for f in c.facts:
        assert len(f.sources) == c.config.n_paraphrases, f.id
        assert len(set(f.sources)) == len(f.sources), f"{f.id}: two statements in one document"
        for did, sentence in zip(f.sources, f.statements):
            assert sentence in split(docs[did]["text"]), (f.id, did, sentence)
            assert states(sentence, f, c.references), (f.id, sentence)
            assert f.id in docs[did]["facts"]
    by_id = {f.id: f for f in c.facts}
    for d in c.documents:
        assert all(d["id"] in by_id[fid].sources for fid in d["facts"]), d["id"]


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_hard_negatives_do_not_state_the_fact(which, request):
    c = request.getfixturevalue(which)
    docs = {d["id"]: d["text"] for d in c.documents}
    split = splitter(c)
    # the same word can answer two facts of one subject (France: demonym and language "French")
    same_answer = {}
    for f in c.facts:
        same_answer.setdefault((f.subject, f.object), set()).update(f.statements)
    longer = longer_names(c)
    for f in c.facts:
        assert f.hard_negatives, f.id
        assert not set(f.hard_negatives) & set(f.sources), f.id
        any_ref = [f.subject] + c.references.get(f.subject, [])
        query_word_negatives = 0
        for did in f.hard_negatives:
            assert any(has_word(docs[did], r) for r in any_ref), (f.id, did)  # it is about the subject
            for s in split(docs[did]):
                if states(s, f, c.references, longer[f.id]):
                    assert s in same_answer[(f.subject, f.object)] and s not in f.statements, (f.id, did, s)
                if has_word(s, f.subject) and has_question_word(s, f) and not has_word(s, f.object):
                    query_word_negatives += 1
        assert query_word_negatives >= 2, f"{f.id}: no negation / near-miss sharing the question's words"


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_negations_are_never_sources(which, request):
    c = request.getfixturevalue(which)
    split = splitter(c)
    by_subject = {}
    for f in c.facts:
        by_subject.setdefault(f.subject, []).append(f)
    longer = longer_names(c)  # "Guinea" in "Equatorial Guinea" is not Guinea
    negated = set()
    for d in c.documents:
        negations = [s for s in split(d["text"]) if NEGATION.search(s)]
        if negations:
            assert d["facts"] == [], f"{d['id']} holds a negation and states {d['facts']}"
        for s in negations:
            for subj, fs in by_subject.items():
                for f in fs:
                    if subj.lower() not in s.lower() or not has_word(mask(s, longer[f.id]), subj):
                        continue
                    if has_question_word(s, f):
                        assert not has_word(mask(s, longer[f.id]), f.object), (f.id, s)  # never denies the truth
                        assert d["id"] not in f.sources and d["id"] in f.hard_negatives, (f.id, d["id"])
                        negated.add(f.id)
    for f in c.facts:
        assert not any(NEGATION.search(s) for s in f.statements), f.id
    assert negated == {f.id for f in c.facts}  # every fact has its negation


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_share_of_sources_without_the_subjects_name(which, request):
    c = request.getfixturevalue(which)
    docs = {d["id"]: d["text"] for d in c.documents}
    n = c.config.n_paraphrases
    k = n - max(1, n // 2)  # indirect statements of a fact with a usable reference
    unnamed_total = guaranteed = 0
    for f in c.facts:
        unnamed = sum(not has_word(docs[d], f.subject) for d in f.sources)
        plain = sum(not has_word(s, f.subject) and not has_question_word(s, f) for s in f.statements)
        unnamed_total += unnamed
        usable = (not has_word(f.object, f.subject)
                  and any(not has_question_word(r, f) for r in references(c.references, f)[1:]))
        if usable:
            guaranteed += k
            assert unnamed >= k, (f.id, unnamed)
            assert plain >= math.ceil(k / 2), (f.id, plain, f.statements)
    share = unnamed_total / sum(len(f.sources) for f in c.facts)
    assert share >= guaranteed / sum(len(f.sources) for f in c.facts)
    assert share >= SHARE_FLOOR[which], share
    assert c.stats()["hard"]["share_sources_without_subject_name"] == pytest.approx(share)


def test_standard_sources_all_name_their_subject():
    """The measure above tells the worlds apart: every standard source names its subject."""
    c = build_corpus(0, wb.SIZES["tiny"].corpus)
    docs = {d["id"]: d["text"] for d in c.documents}
    assert all(has_word(docs[d], f.subject) for f in c.facts for d in f.sources)


def test_templates_and_questions():
    for rel, spec in hard.HARD_TEMPLATES.items():
        probe = type("F", (), {"question": RELATIONS[rel]["question"].format(s="X"), "subject": "X"})
        assert question_stems(probe)
        for t in spec["reworded"]:
            assert not has_question_word(t.format(s="", o=""), probe), (rel, t)
        for kind in ("lexical", "negation", "near_miss"):
            assert all(has_question_word(t.format(s="", o=""), probe) for t in spec[kind]), (rel, kind)
        assert all(NEGATION.search(t) for t in spec["negation"])
        assert not any(NEGATION.search(t) for kind in ("lexical", "reworded", "near_miss") for t in spec[kind])


def test_questions_not_in_corpus(full):
    alltext = "\n".join(d["text"] for d in full.documents)
    assert not any(f.question in alltext for f in full.facts)


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_references_do_not_name_their_entity(which, request):
    c = request.getfixturevalue(which)
    owners = {}
    for name, refs in c.references.items():
        assert refs and len(set(refs)) == len(refs)
        for r in refs:
            assert name.lower() not in r.lower() and not has_word(r, name), (name, r)
            owners.setdefault(r.lower(), []).append(name)
    assert all(len(v) == 1 for v in owners.values()), {k: v for k, v in owners.items() if len(v) > 1}
    assert len(c.references) >= (25 if which == "tiny" else 200)


# ------------------------------------------------------------------------------------ the built world


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("msif-hard")
    return root, wb.load_world(size="tiny", world="hard", cache_dir=root, progress=False)


def test_tiny_hard_world_builds(tiny_world, tiny):
    root, w = tiny_world
    assert w.kind == "hard" and "hard" in repr(w)
    assert w.path == wb.world_dir("tiny", 0, root, world="hard") != wb.world_dir("tiny", 0, root)
    assert w.meta["hash"] == wb.world_hash("tiny", 0, world="hard")
    assert w.references == tiny.references
    assert [d["text"] for d in w.documents] == [d["text"] for d in tiny.documents]
    assert w.meta["stats"]["hard"]["sources_without_subject_name"] > 0
    ids = {d["id"] for d in w.documents}
    assert all(set(f.sources) | set(f.hard_negatives) <= ids for f in w.facts)
    assert len(w.test_facts) >= 5, "the hard world must still teach the model facts it was not fine-tuned on"
    assert all(f.split == "heldout" for f in w.test_facts)
    assert w.load_finetuned().config.max_position_embeddings == wb.world_config("tiny", "hard").max_positions


def test_fact_tracing_refuses_a_world_of_the_other_kind(tiny_world):
    from msif.eval.fact_tracing import FactTracingConfig, quick_config, run_fact_tracing

    assert FactTracingConfig().world == "standard" and quick_config(world="hard").size == "tiny"
    with pytest.raises(ValueError, match="hard world"):
        run_fact_tracing(quick_config(), world=tiny_world[1], progress=False)


def test_cli_rejects_an_unknown_world(tmp_path):
    from typer.testing import CliRunner

    from msif.cli import app

    r = CliRunner().invoke(app, ["bench", "fact-tracing", "--world", "medium", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "--world must be one of standard, hard, not 'medium'" in r.output
    assert not (tmp_path / "o").exists()


def test_quick_fact_tracing_on_the_hard_world(tiny_world, tmp_path):
    """The benchmark end to end on the tiny hard world: every method reported, the random control at its
    analytic chance level, the outputs naming the world."""
    from msif.eval.fact_tracing import QA_METHODS, markdown, quick_config, run_fact_tracing

    res = run_fact_tracing(quick_config(world="hard", trials=1, classification=False), world=tiny_world[1],
                           cache_dir=tmp_path, progress=False)
    assert res["world"]["kind"] == "hard" and res["world"]["hard"]["sources_without_subject_name"] > 0
    for setting in ("knn", "pool"):
        rows = [r for r in res["results"] if r["task"] == "qa" and r["setting"] == setting]
        assert {r["method"] for r in rows} == set(QA_METHODS)
        assert all(0 <= r["mrr"]["mean"] <= 1 for r in rows)
        chance = next(c for c in res["chance"] if c["task"] == "qa" and c["setting"] == setting)["mrr"]["mean"]
        rnd = next(r for r in rows if r["method"] == "random")["mrr"]["mean"]
        assert abs(rnd - chance) < 0.15
    assert "hard world" in markdown(res)
