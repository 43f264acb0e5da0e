"""Build (once) and load the bundled world: corpus, tokenizer, pre-trained and fine-tuned models.

:func:`load_world` returns a :class:`World`, building it on first use into a cache directory
(``$MSIF_CACHE`` or ``~/.cache/msif``, subdirectory ``world-<hash>``; the hash covers the build code
version, the size preset, the world variant and the seed). The two variants share the facts, the
splits and the training recipe: ``world="standard"`` (the corpus of :mod:`msif.worldfacts.corpus`)
and ``world="hard"`` (:mod:`msif.worldfacts.hard`: most sources state their fact by an alias or a
derived phrase and without the question's words; negations and near-misses are hard negatives). A
build runs in a temporary sibling directory that is renamed into place only once complete, so a
killed build never leaves a half-written world behind; leftover temporary directories are ignored
(and removed by a later build when their process is gone).

Stages (each timed and recorded in ``world.json``):

1. corpus: facts, documents, QA pairs (:mod:`msif.worldfacts.corpus`);
2. tokenizer: byte-level BPE trained on the corpus and the QA text, wrapped as a
   ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` (eos) and ``<|pad|>`` (pad);
3. pre-training: a small GPT-NeoX from scratch, next-token loss on every document token
   (documents encoded by :func:`msif.data.encoding.encode_text`, one sequence per document);
4. QA fine-tuning: full-parameter, from θ_pt, on ``qa_prompt(question)`` → ``answer`` for the
   fine-tuning facts, loss on answer tokens and the EOS that ends the answer
   (:func:`msif.data.encoding.encode_prompt_answer` with ``add_eos=True``), so that greedy decoding stops;
5. classifier: ``GPTNeoXForSequenceClassification`` initialised from the pre-trained backbone with a
   new head (its rows start as the LM head rows of the label words' first tokens; the LM head is
   dropped), full-parameter trained on "On which continent is X?" → continent for the fine-tuning
   continent facts, ``config.pad_token_id`` set so the last real token is pooled;
6. evaluation: a held-out fact is a *test fact* when the QA model's greedy decoding of its prompt
   is exactly the answer's tokens followed by EOS (checked exactly, by teacher forcing: greedy decoding
   reproduces them iff the argmax at every answer position is the next token).

Where the pieces live: :mod:`~msif.worldfacts.config` (presets, hash), :mod:`~msif.worldfacts.training`
(tokenizer, training loop), :mod:`~msif.worldfacts.qa` (prompts, examples), :mod:`~msif.worldfacts.evaluation`,
:mod:`~msif.worldfacts.world` (the :class:`World` handle), :mod:`~msif.worldfacts.cache` (directories),
:mod:`~msif.worldfacts.retrain` (:func:`finetune_qa`, :func:`pretrain_lm`); all importable from here too.

Layout of a world directory::

    world.json            metadata: config, stats, timings, accuracies, test fact ids
    corpus.jsonl          {"id", "text", "facts", "mentions"} per pre-training document
    facts.jsonl           one Fact per line (question, answer, split, sources, hard_negatives, test)
    references.json       hard world only: entity name -> the phrases that refer to it without its name
    qa_finetune.jsonl     {"fact_id", "prompt", "answer"}: the fine-tuning data
    qa_test.jsonl         {"fact_id", "prompt", "answer"}: the test facts
    cls_finetune.jsonl    {"fact_id", "text", "label"}: the classifier's training data
    cls_heldout.jsonl     {"fact_id", "text", "label"}: the classifier's held-out data
    tokenizer/ pretrained/ finetuned/ classifier/   save_pretrained outputs (safetensors); each model
                                                    directory holds a copy of the tokenizer too
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from msif.data.encoding import encode_text
from msif.worldfacts.cache import clean_stale, default_cache_root, is_built, world_dir
from msif.worldfacts.config import (
    BUILD_VERSION,
    SIZES,
    WORLDS,
    TrainConfig,
    WorldConfig,
    config_record,
    world_config,
    world_hash,
)
from msif.worldfacts.corpus import WorldCorpus, build_corpus, write_corpus
from msif.worldfacts.evaluation import (
    classifier_predictions,
    greedy_correct,
    majority_baseline,
    per_relation_accuracy,
    qa_correct,
    share,
)
from msif.worldfacts.facts import Fact
from msif.worldfacts.jsonl import write_jsonl
from msif.worldfacts.qa import (
    CONTINENT_LABELS,
    classification_examples,
    classification_rows,
    classification_text,
    qa_examples,
    qa_prompt,
    qa_rows,
)
from msif.worldfacts.retrain import finetune_qa, pretrain_lm
from msif.worldfacts.training import (
    EOS,
    PAD,
    init_head_from_label_words,
    lm_config,
    quiet_transformers,
    torch_state,
    train_model,
    train_tokenizer,
)
from msif.worldfacts.world import World

__all__ = [
    "build_world", "load_world",
    # the pieces, from the modules that hold them
    "BUILD_VERSION", "SIZES", "WORLDS", "TrainConfig", "WorldConfig", "config_record", "world_config", "world_hash",
    "default_cache_root", "is_built", "world_dir", "World",
    "CONTINENT_LABELS", "classification_text", "qa_examples", "qa_prompt",
    "EOS", "PAD", "init_head_from_label_words", "train_tokenizer",
    "classifier_predictions", "greedy_correct", "finetune_qa", "pretrain_lm",
]


def build_world(out_dir: str | Path, size: str = "full", seed: int = 0, config: WorldConfig | None = None,
                progress: bool = True, threads: int | None = None, world: str = "standard") -> dict:
    """Build every artefact of a world into ``out_dir`` (not atomic; see :func:`load_world`).

    Returns the metadata also written to ``out_dir/world.json`` (written last).
    """
    cfg = config or world_config(size, world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    threads = threads or 1  # one thread: deterministic, and far faster than two on a shared machine
    meta: dict = {"build_version": BUILD_VERSION, "size": size, "seed": seed, "config": config_record(cfg),
                  "hash": world_hash(size, seed, cfg), "qa_prompt_template": qa_prompt("{question}"),
                  "qa_add_eos": False, "continent_labels": CONTINENT_LABELS}
    with torch_state(threads, seed):
        with _timed(timings, "corpus"):
            corpus = build_corpus(seed, cfg.corpus)
        _log(f"corpus: {len(corpus.facts)} facts, {len(corpus.documents)} documents ({timings['corpus']:.1f}s)", progress)
        with _timed(timings, "tokenizer"):
            tokenizer = _tokenizer(corpus, cfg, out)
        _log(f"tokenizer: {len(tokenizer)} tokens ({timings['tokenizer']:.1f}s)", progress)
        with _timed(timings, "pretrain"):
            pt = _pretrain(corpus, tokenizer, cfg, seed, out, progress)
        _log(f"pre-training: {pt.n_tokens} tokens x {cfg.pretrain.epochs} epochs, loss {pt.history[0]:.3f} -> "
             f"{pt.history[-1]:.3f} ({timings['pretrain']:.1f}s)", progress)
        with _timed(timings, "finetune"):
            ft = _finetune(corpus, tokenizer, cfg, seed, out, progress)
        _log(f"QA fine-tuning: {ft.n_examples} pairs, loss {ft.history[0]:.3f} -> {ft.history[-1]:.3f} "
             f"({timings['finetune']:.1f}s)", progress)
        with _timed(timings, "classifier"):
            clf = _classifier(ft, pt.model, tokenizer, cfg, seed, out, progress)
        _log(f"classifier: {len(clf.finetune_facts)} examples ({timings['classifier']:.1f}s)", progress)
        with _timed(timings, "evaluate"):
            acc = _evaluate(ft, clf, tokenizer)
        _write_data(out, corpus, ft, clf)
    meta.update(_summary(corpus, tokenizer, pt, ft, clf, timings, acc))
    (out / "world.json").write_text(json.dumps(meta, indent=1))
    _log(f"test facts: {len(meta['test_facts'])}; QA accuracy finetune {acc['qa_finetune']['accuracy']:.3f}, "
         f"held-out {acc['qa_heldout']['accuracy']:.3f}; timings " +
         ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()), progress)
    return meta


# --------------------------------------------------------------------------------------------------
# Stages of the build (numbered as in the module docstring)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Pretrained:
    model: torch.nn.Module
    history: list[float]  # mean loss per epoch
    n_tokens: int  # document tokens seen per epoch


@dataclass
class _Finetuned:
    model: torch.nn.Module
    history: list[float]
    n_examples: int
    finetune_facts: list[Fact]
    heldout_facts: list[Fact]


@dataclass
class _Classifier:
    model: torch.nn.Module
    history: list[float]  # empty when there was nothing to train on
    labels: dict[str, int]  # continent -> class index
    finetune_facts: list[Fact]  # continent facts of the fine-tuning split
    heldout_facts: list[Fact]


def _tokenizer(corpus: WorldCorpus, cfg: WorldConfig, out: Path):
    """2. Byte-level BPE on the documents and the QA text, saved to ``out/tokenizer``."""
    texts = [d["text"] for d in corpus.documents] + [qa_prompt(f.question) + f.answer for f in corpus.facts]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    return tokenizer


def _pretrain(corpus: WorldCorpus, tokenizer, cfg: WorldConfig, seed: int, out: Path, progress: bool) -> _Pretrained:
    """3. A GPT-NeoX from scratch on every document token, saved to ``out/pretrained``."""
    from transformers import GPTNeoXForCausalLM

    docs = [encode_text(tokenizer, d["text"], max_length=cfg.max_positions, index=i)
            for i, d in enumerate(corpus.documents)]
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(lm_config(tokenizer, cfg))
    history = train_model(model, docs, cfg.pretrain, tokenizer.pad_token_id, seed, "pre-training", progress)
    model.save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    return _Pretrained(model, history, sum(len(e.input_ids) for e in docs))


def _finetune(corpus: WorldCorpus, tokenizer, cfg: WorldConfig, seed: int, out: Path, progress: bool) -> _Finetuned:
    """4. QA fine-tuning from θ_pt on the fine-tuning facts, saved to ``out/finetuned``."""
    from transformers import GPTNeoXForCausalLM

    ft_facts = [f for f in corpus.facts if f.split == "finetune"]
    ho_facts = [f for f in corpus.facts if f.split == "heldout"]
    qa = qa_examples(tokenizer, ft_facts)
    model = GPTNeoXForCausalLM.from_pretrained(out / "pretrained")
    history = train_model(model, qa, cfg.finetune, tokenizer.pad_token_id, seed + 1, "QA fine-tuning", progress)
    model.save_pretrained(out / "finetuned")
    tokenizer.save_pretrained(out / "finetuned")
    return _Finetuned(model, history, len(qa), ft_facts, ho_facts)


def _classifier(ft: _Finetuned, lm, tokenizer, cfg: WorldConfig, seed: int, out: Path, progress: bool) -> _Classifier:
    """5. The continent of a country: a new head on the pre-trained backbone ``lm``, saved to ``out/classifier``."""
    from transformers import GPTNeoXForSequenceClassification

    pad = tokenizer.pad_token_id
    lab = {c: i for i, c in enumerate(CONTINENT_LABELS)}
    cls_ft = [f for f in ft.finetune_facts if f.relation == "continent"]
    cls_ho = [f for f in ft.heldout_facts if f.relation == "continent"]
    examples = classification_examples(tokenizer, cls_ft, lab)
    torch.manual_seed(seed + 2)
    with quiet_transformers():  # the expected "embed_out unused / score newly initialised" report
        clf = GPTNeoXForSequenceClassification.from_pretrained(
            out / "pretrained", num_labels=len(CONTINENT_LABELS),
            id2label=dict(enumerate(CONTINENT_LABELS)), label2id=lab, pad_token_id=pad)
    clf.config.pad_token_id = pad
    init_head_from_label_words(clf, lm, tokenizer, CONTINENT_LABELS)
    history = train_model(clf, examples, cfg.classifier, pad, seed + 2, "classifier", progress,
                          classification=True) if examples else []
    clf.save_pretrained(out / "classifier")
    tokenizer.save_pretrained(out / "classifier")
    return _Classifier(clf, history, lab, cls_ft, cls_ho)


def _evaluate(ft: _Finetuned, clf: _Classifier, tokenizer) -> dict:
    """6. Accuracies; marks the held-out facts the QA model answers exactly as test facts (``Fact.test``)."""
    ft_ok = qa_correct(ft.model, tokenizer, ft.finetune_facts)
    ho_ok = qa_correct(ft.model, tokenizer, ft.heldout_facts)
    for f, ok in zip(ft.heldout_facts, ho_ok):
        f.test = bool(ok)
    acc: dict = {
        "qa_finetune": {"accuracy": share(ft_ok), "per_relation": per_relation_accuracy(ft.finetune_facts, ft_ok)},
        "qa_heldout": {"accuracy": share(ho_ok), "per_relation": per_relation_accuracy(ft.heldout_facts, ho_ok)},
        # what guessing the most frequent fine-tuning answer of the relation gets
        "qa_heldout_majority_baseline": majority_baseline(ft.finetune_facts, ft.heldout_facts),
    }
    if clf.finetune_facts:
        for name, facts in (("classifier_finetune", clf.finetune_facts), ("classifier_heldout", clf.heldout_facts)):
            preds = classifier_predictions(clf.model, tokenizer, [classification_text(f) for f in facts])
            acc[name] = share([p == clf.labels[f.object] for p, f in zip(preds, facts)])
    return acc


def _write_data(out: Path, corpus: WorldCorpus, ft: _Finetuned, clf: _Classifier) -> None:
    """The corpus, facts, QA and classifier JSONL files of the world directory."""
    write_corpus(corpus, out)
    write_jsonl(out / "qa_finetune.jsonl", qa_rows(ft.finetune_facts))
    write_jsonl(out / "qa_test.jsonl", qa_rows([f for f in ft.heldout_facts if f.test]))
    write_jsonl(out / "cls_finetune.jsonl", classification_rows(clf.finetune_facts, clf.labels))
    write_jsonl(out / "cls_heldout.jsonl", classification_rows(clf.heldout_facts, clf.labels))


def _summary(corpus: WorldCorpus, tokenizer, pt: _Pretrained, ft: _Finetuned, clf: _Classifier,
             timings: dict[str, float], acc: dict) -> dict:
    """The ``world.json`` entries a build adds to its configuration: stats, timings, losses, accuracies."""
    stats = corpus.stats()
    stats["pretrain_tokens"] = pt.n_tokens
    stats["vocab_size"] = len(tokenizer)
    stats["parameters"] = {
        "pretrained": sum(p.numel() for p in pt.model.parameters()),
        "classifier": sum(p.numel() for p in clf.model.parameters()),
    }
    return {
        "stats": stats,
        "timings_s": timings,
        "loss_history": {"pretrain": pt.history, "finetune": ft.history, "classifier": clf.history},
        "accuracy": acc,
        "test_facts": [f.id for f in ft.heldout_facts if f.test],
    }


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str):
    """Record the wall time of the block as ``timings[stage]`` (seconds)."""
    t0 = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - t0


def _log(msg: str, progress: bool):
    if progress:
        print(f"[msif.worldfacts] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Loading, building on first use
# --------------------------------------------------------------------------------------------------


def load_world(seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True, size: str = "full",
               config: WorldConfig | None = None, rebuild: bool = False, threads: int | None = None,
               world: str = "standard") -> World:
    """The bundled world for ``seed``, ``size`` ("full" or "tiny") and ``world`` ("standard" or
    "hard"; ``config``, when given, decides instead), built on first use.

    ``cache_dir`` is the cache root (default ``$MSIF_CACHE`` or ``~/.cache/msif``). A complete world is
    reused as is. Otherwise it is built in ``.world-<hash>.tmp-<pid>-<rand>`` next to its final place
    and renamed into place when complete; if another process finished first, its copy is kept.
    ``rebuild=True`` builds afresh and replaces the cached copy.
    """
    if config is None:
        config = world_config(size, world)  # checks size and world
    final = world_dir(size, seed, cache_dir, config)
    if is_built(final) and not rebuild:
        return World(final)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root, final.name)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _log(f"building the {size} {config.corpus.style} world (seed {seed}) in {final}", progress)
        build_world(tmp, size=size, seed=seed, config=config, progress=progress, threads=threads)
        if final.exists() and (rebuild or not is_built(final)):  # stale or incomplete (no world.json)
            old = root / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_built(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return World(final)
