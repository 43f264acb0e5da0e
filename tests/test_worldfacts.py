"""Tests of the bundled world: corpus ground truth, determinism, cache behaviour, built models.

Model tests use the ``tiny`` world (built once per module into a temporary cache root).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from msif.data.encoding import encode_prompt_answer
from msif.worldfacts import build as wb
from msif.worldfacts.corpus import RELATIONS, Fact, build_corpus, renderings, write_corpus
from msif.worldfacts.jsonl import read_jsonl

TINY = wb.SIZES["tiny"]


def _has_word(text: str, name: str) -> bool:
    return re.search(r"(?<![A-Za-z])" + re.escape(name) + r"(?![A-Za-z])", text) is not None


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(0, TINY.corpus)


@pytest.fixture(scope="module")
def full_corpus():
    return build_corpus(0, wb.SIZES["full"].corpus)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A cache root holding the tiny world; before the build it held a killed build's leftovers."""
    root = tmp_path_factory.mktemp("msif-cache")
    final = wb.world_dir("tiny", 0, root)
    # a half-written build of a process that no longer exists, complete with a world.json
    stale = root / f".{final.name}.tmp-999999999-deadbeef"
    (stale / "pretrained").mkdir(parents=True)
    (stale / "world.json").write_text("{}")
    (stale / "pretrained" / "model.safetensors").write_bytes(b"truncated")
    # a half-written build of a live process (ours): must be ignored, not removed
    live = root / f".{final.name}.tmp-{os.getpid()}-cafecafe"
    live.mkdir()
    (live / "world.json").write_text("{}")
    world = wb.load_world(seed=0, size="tiny", cache_dir=root, progress=False)
    return root, world, stale, live


# ---------------------------------------------------------------------------------------------- corpus


def test_corpus_deterministic(corpus):
    again = build_corpus(0, TINY.corpus)
    assert again.documents == corpus.documents
    assert [f.to_dict() for f in again.facts] == [f.to_dict() for f in corpus.facts]
    other = build_corpus(1, TINY.corpus)
    assert [d["text"] for d in other.documents] != [d["text"] for d in corpus.documents]
    # fact ids are stable across seeds; only documents and splits change
    assert [f.id for f in other.facts] == [f.id for f in corpus.facts]


def test_document_ids_and_fields(corpus):
    ids = [d["id"] for d in corpus.documents]
    assert ids == [f"doc-{i:06d}" for i in range(len(ids))]
    for d in corpus.documents:
        assert isinstance(d["text"], str) and d["text"].strip()
        assert d["text"] == d["text"].strip() and "  " not in d["text"]


@pytest.mark.parametrize("which", ["corpus", "full_corpus"])
def test_sources_state_their_fact(which, request):
    c = request.getfixturevalue(which)
    docs = {d["id"]: d for d in c.documents}
    n_para = c.config.n_paraphrases
    for f in c.facts:
        assert len(f.sources) == min(n_para, len(RELATIONS[f.relation]["templates"])), f.id
        assert len(set(f.sources)) == len(f.sources), f"{f.id}: two statements in one document"
        assert len(set(f.statements)) == len(f.statements), f"{f.id}: a template used twice"
        for did, sentence in zip(f.sources, f.statements):
            text = docs[did]["text"]
            assert sentence in renderings(f)
            assert sentence in text
            assert _has_word(text, f.subject) and f.object in text
            assert f.id in docs[did]["facts"]


@pytest.mark.parametrize("which", ["corpus", "full_corpus"])
def test_facts_field_is_complete(which, request):
    """A document lists exactly the facts of its mentioned subjects that it states."""
    c = request.getfixturevalue(which)
    by_subject: dict[str, list[Fact]] = {}
    for f in c.facts:
        by_subject.setdefault(f.subject, []).append(f)
    for d in c.documents:
        for e in d["mentions"]:
            assert _has_word(d["text"], e), (d["id"], e)
            for f in by_subject.get(e, []):
                stated = any(r in d["text"] for r in renderings(f))
                assert stated == (f.id in d["facts"]), (d["id"], f.id)


@pytest.mark.parametrize("which", ["corpus", "full_corpus"])
def test_hard_negatives(which, request):
    c = request.getfixturevalue(which)
    docs = {d["id"]: d for d in c.documents}
    for f in c.facts:
        assert f.hard_negatives, f"{f.id} has no hard negative"
        assert not set(f.hard_negatives) & set(f.sources)
        for did in f.hard_negatives:
            text = docs[did]["text"]
            assert _has_word(text, f.subject)
            assert f.id not in docs[did]["facts"]
            assert not any(r in text for r in renderings(f)), (f.id, did)


def test_qa_pairs_and_split(full_corpus):
    c = full_corpus
    alltext = "\n".join(d["text"] for d in c.documents)
    rels = {}
    for f in c.facts:
        assert f.answer == " " + f.object and not f.object.startswith(" ")
        assert f.subject in f.question and f.object not in f.question
        assert f.question not in alltext  # phrased unlike the pre-training text
        assert f.split in ("finetune", "heldout")
        rels.setdefault(f.relation, set()).add(f.split)
    assert set(rels) == set(RELATIONS)
    assert all(s == {"finetune", "heldout"} for s in rels.values())
    again = build_corpus(0, wb.SIZES["full"].corpus)
    assert [f.split for f in again.facts] == [f.split for f in c.facts]
    assert len(c.facts) >= 1000


def test_jsonl_roundtrip(corpus, tmp_path):
    cp, fp = write_corpus(corpus, tmp_path)
    rows = read_jsonl(cp)
    assert [r["id"] for r in rows] == [d["id"] for d in corpus.documents]
    assert all({"id", "text", "facts"} <= set(r) for r in rows)
    facts = [Fact.from_dict(r) for r in read_jsonl(fp)]
    assert [f.to_dict() for f in facts] == [f.to_dict() for f in corpus.facts]


def test_tokenizer_deterministic(corpus):
    texts = [d["text"] for d in corpus.documents]
    a = wb.train_tokenizer(texts, 600)
    b = wb.train_tokenizer(texts, 600)
    assert a.get_vocab() == b.get_vocab()
    for t in texts[:50]:
        assert a(t)["input_ids"] == b(t)["input_ids"]
    assert a.eos_token_id is not None and a.pad_token_id is not None and a.eos_token_id != a.pad_token_id


# ---------------------------------------------------------------------------------------------- cache


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path))
    assert wb.world_dir("tiny", 0).parent == tmp_path
    assert wb.world_dir("tiny", 0) != wb.world_dir("tiny", 1)
    assert wb.world_dir("tiny", 0) != wb.world_dir("full", 0)
    with pytest.raises(ValueError):
        wb.load_world(size="huge", cache_dir=tmp_path)


def test_half_written_temp_dirs_ignored(tiny_root):
    root, world, stale, live = tiny_root
    assert world.path == wb.world_dir("tiny", 0, root)
    assert wb.is_built(world.path)
    assert world.meta["size"] == "tiny" and world.meta["stats"]["facts"] > 0
    assert not stale.exists()  # its process is gone: cleaned
    assert live.exists()  # a build in progress is left alone
    assert [p for p in root.glob(f".{world.path.name}.tmp-*") if p != live] == []  # no leftovers of our build
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [world.path.name]


def test_cache_reused(tiny_root, monkeypatch):
    root, world, _, _ = tiny_root

    def boom(*a, **k):
        raise AssertionError("rebuilt a cached world")

    monkeypatch.setattr(wb, "build_world", boom)
    again = wb.load_world(seed=0, size="tiny", cache_dir=root, progress=False)
    assert again.path == world.path
    assert again.meta == world.meta
    # a directory without world.json is not a world: it is rebuilt (here: the patched builder is called)
    other = wb.world_dir("tiny", 5, root)
    (other / "tokenizer").mkdir(parents=True)
    with pytest.raises(AssertionError, match="rebuilt"):
        wb.load_world(seed=5, size="tiny", cache_dir=root, progress=False)
    assert not list(root.glob(f".{other.name}.tmp-*"))  # the failed build cleaned up after itself


# ---------------------------------------------------------------------------------------------- world


def test_world_files(tiny_root):
    _, w, _, _ = tiny_root
    for p in (w.corpus_path, w.facts_path, w.qa_finetune_path, w.qa_test_path, w.cls_finetune_path):
        assert p.is_file()
    assert (w.tokenizer_dir / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    ref = w.load_tokenizer()
    for d in (w.pretrained_dir, w.finetuned_dir, w.classifier_dir):
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        tok = AutoTokenizer.from_pretrained(d)  # each model directory is self-contained
        assert tok.get_vocab() == ref.get_vocab() and tok.pad_token_id == ref.pad_token_id
    assert {d["id"] for d in w.documents} >= {s for f in w.facts for s in w.sources(f.id)}
    f0 = w.facts[0]
    assert f0.id in w.document(w.sources(f0.id)[0])["facts"]
    assert f0.id not in w.document(w.hard_negatives(f0.id)[0])["facts"]
    test = w.test_facts
    assert all(f.split == "heldout" for f in test)
    assert [f.id for f in test] == w.meta["test_facts"]
    assert [r["fact_id"] for r in read_jsonl(w.qa_test_path)] == w.meta["test_facts"]
    ft = read_jsonl(w.qa_finetune_path)
    assert {r["fact_id"] for r in ft} == {f.id for f in w.finetune_facts}
    assert all(r["prompt"] == w.qa_prompt(w.fact(r["fact_id"]).question) for r in ft)


def test_models_load_and_agree(tiny_root):
    _, w, _, _ = tiny_root
    tok = w.load_tokenizer()
    pt, ft, clf = w.load_pretrained(), w.load_finetuned(), w.load_classifier()
    assert clf.config.pad_token_id == tok.pad_token_id
    assert clf.config.num_labels == len(w.continent_labels)
    assert pt.config.vocab_size == ft.config.vocab_size == len(tok)
    # fine-tuning moved the weights, and the classifier's backbone started from the pre-trained one
    assert not torch.equal(pt.gpt_neox.layers[0].mlp.dense_h_to_4h.weight, ft.gpt_neox.layers[0].mlp.dense_h_to_4h.weight)
    # the teacher-forced correctness check agrees with real greedy decoding
    facts = w.heldout_facts[:12] + w.finetune_facts[:12]
    fast = wb.greedy_correct(ft, tok, [w.qa_prompt(f.question) for f in facts], [f.answer for f in facts])
    for f, ok in zip(facts, fast):
        enc = encode_prompt_answer(tok, w.qa_prompt(f.question), f.answer)
        n_ans = sum(enc.target_mask)
        prompt_ids = enc.input_ids[: len(enc.input_ids) - n_ans]
        ids = torch.tensor([prompt_ids])
        gen = ft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_ans, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        assert (gen[0, len(prompt_ids):].tolist() == enc.input_ids[len(prompt_ids):]) == ok, f.id
    # stored test facts are exactly the held-out facts answered correctly
    ho = w.heldout_facts
    oks = wb.greedy_correct(ft, tok, [w.qa_prompt(f.question) for f in ho], [f.answer for f in ho])
    assert [f.id for f, ok in zip(ho, oks) if ok] == w.meta["test_facts"]


def test_tiny_build_deterministic(tiny_root, tmp_path):
    """Same seed: identical corpus, tokenizer and weights."""
    from safetensors.torch import load_file

    _, w, _, _ = tiny_root
    meta = wb.build_world(tmp_path / "again", size="tiny", seed=0, progress=False)
    assert (tmp_path / "again" / "corpus.jsonl").read_bytes() == w.corpus_path.read_bytes()
    assert (tmp_path / "again" / "facts.jsonl").read_bytes() == w.facts_path.read_bytes()
    assert (tmp_path / "again" / "tokenizer" / "tokenizer.json").read_bytes() == (w.tokenizer_dir / "tokenizer.json").read_bytes()
    for sub in ("pretrained", "finetuned", "classifier"):
        a = load_file(tmp_path / "again" / sub / "model.safetensors")
        b = load_file(w.path / sub / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    assert meta["test_facts"] == w.meta["test_facts"]
    assert meta["accuracy"] == w.meta["accuracy"]


def test_classifier_head_init_matches_lm(tiny_root):
    """The new head starts as the LM head's label-word rows: same scores as the LM's next-token logits."""
    from transformers import GPTNeoXForSequenceClassification

    _, w, _, _ = tiny_root
    tok, lm = w.load_tokenizer(), w.load_pretrained()
    labels = w.continent_labels
    clf = GPTNeoXForSequenceClassification.from_pretrained(w.pretrained_dir, num_labels=len(labels),
                                                           pad_token_id=tok.pad_token_id).eval()
    wb.init_head_from_label_words(clf, lm, tok, labels)
    rows = [tok(" " + c, add_special_tokens=False)["input_ids"][0] for c in labels]
    assert len(set(rows)) == len(rows)
    texts = [f.question for f in w.facts if f.relation == "continent"][:5]
    ids = tok(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = lm(input_ids=ids).logits[0, -1, rows]
        got = clf(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # batched with right padding, the classifier pools the last real token of each row
    preds = wb.classifier_predictions(clf, tok, texts)
    single = [int(clf(input_ids=tok(t, return_tensors="pt")["input_ids"]).logits.argmax()) for t in texts]
    assert preds == single


def test_world_corpus_name(corpus):
    """The world's corpus is a WorldCorpus, not to be confused with the file reader msif.data.corpus.Corpus."""
    import msif.worldfacts as wf
    from msif.data.corpus import Corpus
    from msif.worldfacts.corpus import WorldCorpus

    assert isinstance(corpus, WorldCorpus) and wf.WorldCorpus is WorldCorpus and WorldCorpus is not Corpus
    assert not hasattr(wf, "Corpus")
