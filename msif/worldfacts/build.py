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
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from msif.data.encoding import collate, encode_classification, encode_prompt_answer, encode_text
from msif.worldfacts.corpus import CorpusConfig, Fact, build_corpus, read_jsonl, write_corpus, write_jsonl

#: Bump when anything that changes the built artefacts changes (invalidates caches).
BUILD_VERSION = "4"  # 4: QA fine-tuning teaches the model to end its answer (EOS)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CONTINENT_LABELS = ["Africa", "Asia", "Europe", "North America", "Oceania", "South America"]


def qa_prompt(question: str) -> str:
    """The exact prompt used for QA fine-tuning; the answer (with its leading space) follows it."""
    return f"Question: {question}\nAnswer:"


def classification_text(fact: Fact) -> str:
    """The classifier's input for a continent fact (the fact's question)."""
    return fact.question


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage (AdamW, linear warm-up then cosine decay)."""

    epochs: int
    lr: float
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.1


@dataclass
class WorldConfig:
    """Everything that determines a built world (apart from the seed)."""

    corpus: CorpusConfig
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 256
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, lr=3e-3))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=5e-4))
    classifier: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15, lr=2e-4, batch_size=16))


SIZES: dict[str, WorldConfig] = {
    "full": WorldConfig(corpus=CorpusConfig()),
    "tiny": WorldConfig(
        corpus=CorpusConfig(max_countries=30, max_cities=20, n_paraphrases=3, mention_docs_per_subject=1),
        vocab_size=600,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        max_positions=128,
        pretrain=TrainConfig(epochs=15, lr=3e-3, batch_size=16),
        finetune=TrainConfig(epochs=10, lr=1e-3, batch_size=16),
        classifier=TrainConfig(epochs=10, lr=1e-3, batch_size=16),
    ),
}


#: World variants: the corpus style of the size preset's configuration.
WORLDS = ("standard", "hard")


def world_config(size: str = "full", world: str = "standard") -> WorldConfig:
    """The configuration of a size preset ("full", "tiny") for a world variant ("standard", "hard")."""
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {sorted(SIZES)}")
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")
    cfg = SIZES[size]
    if world == "standard":
        return cfg
    # hard documents hold rare alias words that tokenise into many pieces; rotary positions add no
    # parameters, so allowing 256 keeps the model the same and no document needs truncating
    return replace(cfg, corpus=replace(cfg.corpus, style=world), max_positions=max(cfg.max_positions, 256))


def _config_dict(cfg: WorldConfig) -> dict:
    d = asdict(cfg)
    d["corpus"]["relations"] = list(d["corpus"]["relations"])
    if d["corpus"]["style"] == "standard":  # as before the hard world existed: same record, same hash
        del d["corpus"]["style"]
    return d


def world_hash(size: str = "full", seed: int = 0, config: WorldConfig | None = None, world: str = "standard") -> str:
    """Short hash naming a world's cache directory: build version, configuration and seed.

    ``config`` (default: :func:`world_config` of ``size`` and ``world``) decides the variant.
    """
    cfg = config or world_config(size, world)
    blob = {"v": BUILD_VERSION, "size": size, "seed": seed, "config": _config_dict(cfg)}
    if cfg.corpus.style == "hard":
        from msif.worldfacts.hard import HARD_VERSION

        blob["hard_version"] = HARD_VERSION
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    """``$MSIF_CACHE`` if set, else ``~/.cache/msif``."""
    env = os.environ.get("MSIF_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/msif").expanduser()


# --------------------------------------------------------------------------------------------------
# The World handle
# --------------------------------------------------------------------------------------------------


class World:
    """A built world on disk. Paths are attributes; documents and facts load lazily.

    ``test_facts`` are the held-out facts (never fine-tuned on) that the QA fine-tuned model answers
    correctly by greedy decoding; ``sources(fact_id)`` are the ids of the documents stating a fact.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "world.json").read_text())
        self.corpus_path = self.path / "corpus.jsonl"
        self.facts_path = self.path / "facts.jsonl"
        self.qa_finetune_path = self.path / "qa_finetune.jsonl"
        self.qa_test_path = self.path / "qa_test.jsonl"
        self.cls_finetune_path = self.path / "cls_finetune.jsonl"
        self.cls_heldout_path = self.path / "cls_heldout.jsonl"
        self.tokenizer_dir = self.path / "tokenizer"
        self.pretrained_dir = self.path / "pretrained"
        self.finetuned_dir = self.path / "finetuned"
        self.classifier_dir = self.path / "classifier"
        self._documents = None
        self._facts = None

    def __repr__(self) -> str:
        s = self.meta.get("stats", {})
        return (f"World({str(self.path)!r}, size={self.meta.get('size')!r}, world={self.kind!r}, "
                f"seed={self.meta.get('seed')}, "
                f"documents={s.get('documents')}, facts={s.get('facts')}, test_facts={len(self.meta.get('test_facts', []))})")

    @property
    def seed(self) -> int:
        return self.meta["seed"]

    @property
    def kind(self) -> str:
        """The world variant: "standard" or "hard" (the corpus style it was built with)."""
        return self.meta.get("config", {}).get("corpus", {}).get("style", "standard")

    @property
    def references(self) -> dict[str, list[str]]:
        """Hard world: entity name -> the phrases its sources may use instead of its name ({} otherwise)."""
        p = self.path / "references.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def documents(self) -> list[dict]:
        if self._documents is None:
            self._documents = read_jsonl(self.corpus_path)
        return self._documents

    def document(self, doc_id: str) -> dict:
        """The document with this id (``{"id", "text", "facts", "mentions"}``)."""
        if getattr(self, "_doc_index", None) is None:
            self._doc_index = {d["id"]: d for d in self.documents}
        return self._doc_index[doc_id]

    @property
    def facts(self) -> list[Fact]:
        if self._facts is None:
            self._facts = [Fact.from_dict(d) for d in read_jsonl(self.facts_path)]
        return self._facts

    @property
    def fact_index(self) -> dict[str, Fact]:
        return {f.id: f for f in self.facts}

    @property
    def finetune_facts(self) -> list[Fact]:
        return [f for f in self.facts if f.split == "finetune"]

    @property
    def heldout_facts(self) -> list[Fact]:
        return [f for f in self.facts if f.split == "heldout"]

    @property
    def test_facts(self) -> list[Fact]:
        return [f for f in self.facts if f.test]

    def fact(self, fact_id: str) -> Fact:
        return self.fact_index[fact_id]

    def sources(self, fact_id: str) -> list[str]:
        """Ids of the pre-training documents that state the fact (the ground truth of fact tracing)."""
        return list(self.fact(fact_id).sources)

    def hard_negatives(self, fact_id: str) -> list[str]:
        """Ids of documents that mention the fact's subject without stating the fact."""
        return list(self.fact(fact_id).hard_negatives)

    @staticmethod
    def qa_prompt(question: str) -> str:
        """The exact prompt template used in fine-tuning."""
        return qa_prompt(question)

    @property
    def continent_labels(self) -> list[str]:
        return list(self.meta.get("continent_labels", CONTINENT_LABELS))

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def load_pretrained(self):
        from transformers import GPTNeoXForCausalLM

        return GPTNeoXForCausalLM.from_pretrained(self.pretrained_dir).eval()

    def load_finetuned(self):
        from transformers import GPTNeoXForCausalLM

        return GPTNeoXForCausalLM.from_pretrained(self.finetuned_dir).eval()

    def load_classifier(self):
        from transformers import GPTNeoXForSequenceClassification

        return GPTNeoXForSequenceClassification.from_pretrained(self.classifier_dir).eval()


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast`` (eos, pad; no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=1024)


def _lm_config(tokenizer, cfg: WorldConfig):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=4 * cfg.hidden_size,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.0,
    )


def _batches(examples, batch_size: int, gen: random.Random, shuffle: bool = True):
    """Index batches: shuffled, then sorted by length within windows of 32 batches (less padding)."""
    order = list(range(len(examples)))
    if shuffle:
        gen.shuffle(order)
    window = batch_size * 32
    out = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(examples[i].input_ids))
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        gen.shuffle(out)
    return out


def _lr_lambda(total: int, tc: TrainConfig):
    warm = max(1, int(tc.warmup * total))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, total - warm)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


def _token_loss(logits, batch, reduction="mean"):
    """Cross-entropy of the predictions at positions where ``target_mask`` is True (next token)."""
    tm = batch.target_mask[:, :-1]
    lg = logits[:, :-1][tm]
    tg = batch.input_ids[:, 1:][tm]
    return torch.nn.functional.cross_entropy(lg.float(), tg, reduction=reduction)


def _train(model, examples, tc: TrainConfig, pad_id: int, seed: int, desc: str, progress: bool,
           classification: bool = False) -> list[float]:
    """Generic training loop; returns the mean loss per epoch."""
    gen = random.Random(seed)
    n_batches = math.ceil(len(examples) / tc.batch_size)
    total = n_batches * tc.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, tc))
    model.train()
    history = []
    bar = _progress(total, desc, progress)
    for epoch in range(tc.epochs):
        tot, cnt = 0.0, 0
        for idx in _batches(examples, tc.batch_size, gen):
            batch = collate([examples[i] for i in idx], pad_id=pad_id)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            if classification:
                loss = torch.nn.functional.cross_entropy(out.logits.float(), batch.labels)
            else:
                loss = _token_loss(out.logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            cnt += len(idx)
            bar.update(1)
        history.append(tot / max(1, cnt))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    model.eval()
    return history


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def greedy_correct(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 64) -> list[bool]:
    """Whether greedy decoding after each prompt gives exactly the answer's tokens, then EOS.

    Exact and batched by teacher forcing: greedy decoding reproduces the answer tokens iff, with the
    correct answer prefix fed in, the argmax at every answer position is the next answer token.
    Tokens follow :func:`encode_prompt_answer` (prompt and answer tokenised separately).
    """
    model.eval()
    pad = tokenizer.pad_token_id
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = [encode_prompt_answer(tokenizer, p, a, add_eos=True, index=i) for i, (p, a) in
               enumerate(zip(prompts[s : s + batch_size], answers[s : s + batch_size]))]
        b = collate(enc, pad_id=pad)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        pred = logits[:, :-1].argmax(-1)
        ok = (pred == b.input_ids[:, 1:]) | ~b.target_mask[:, :-1]
        out += ok.all(dim=1).tolist()
    return out


@torch.no_grad()
def classifier_predictions(model, tokenizer, texts: list[str], batch_size: int = 64) -> list[int]:
    """Argmax class of a sequence classifier for each text."""
    model.eval()
    preds = []
    for s in range(0, len(texts), batch_size):
        enc = [encode_classification(tokenizer, t, 0, index=i) for i, t in enumerate(texts[s : s + batch_size])]
        b = collate(enc, pad_id=tokenizer.pad_token_id)
        preds += model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.argmax(-1).tolist()
    return preds


@contextlib.contextmanager
def _torch_state(threads: int | None, seed: int):
    """Fix the seed and thread count for a build; restore the caller's RNG and thread settings after."""
    old_threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.set_rng_state(rng_state)


@torch.no_grad()
def _init_head_from_label_words(clf, lm, tokenizer, labels: list[str]):
    """Initialise a classification head from the LM head rows of each label's first token (`` Asia``).

    At initialisation the classifier then scores classes as the pre-trained LM scores the label words
    as next token; fine-tuning starts from the knowledge the pre-trained model already has. (A randomly
    initialised head reached only ~57% held-out accuracy against ~96% with this initialisation.)
    """
    rows = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
    if len(set(rows)) != len(rows):
        return  # label words share a first token: keep the random initialisation
    head = clf.score.weight
    head.copy_(lm.get_output_embeddings().weight[rows].to(head.dtype))


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _log(msg: str, progress: bool):
    if progress:
        print(f"[msif.worldfacts] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------


def build_world(out_dir: str | Path, size: str = "full", seed: int = 0, config: WorldConfig | None = None,
                progress: bool = True, threads: int | None = None, world: str = "standard") -> dict:
    """Build every artefact of a world into ``out_dir`` (not atomic; see :func:`load_world`).

    Returns the metadata also written to ``out_dir/world.json`` (written last).
    """
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    cfg = config or world_config(size, world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    threads = threads or 1  # one thread: deterministic, and far faster than two on a shared machine
    meta: dict = {"build_version": BUILD_VERSION, "size": size, "seed": seed, "config": _config_dict(cfg),
                  "hash": world_hash(size, seed, cfg), "qa_prompt_template": qa_prompt("{question}"),
                  "qa_add_eos": False, "continent_labels": CONTINENT_LABELS}
    with _torch_state(threads, seed):
        # 1. corpus
        t0 = time.perf_counter()
        corpus = build_corpus(seed, cfg.corpus)
        timings["corpus"] = time.perf_counter() - t0
        _log(f"corpus: {len(corpus.facts)} facts, {len(corpus.documents)} documents ({timings['corpus']:.1f}s)", progress)

        # 2. tokenizer
        t0 = time.perf_counter()
        texts = [d["text"] for d in corpus.documents] + [qa_prompt(f.question) + f.answer for f in corpus.facts]
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        tokenizer.save_pretrained(out / "tokenizer")
        pad = tokenizer.pad_token_id
        timings["tokenizer"] = time.perf_counter() - t0
        _log(f"tokenizer: {len(tokenizer)} tokens ({timings['tokenizer']:.1f}s)", progress)

        # 3. pre-training
        t0 = time.perf_counter()
        docs = [encode_text(tokenizer, d["text"], max_length=cfg.max_positions, index=i)
                for i, d in enumerate(corpus.documents)]
        n_tokens = sum(len(e.input_ids) for e in docs)
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(_lm_config(tokenizer, cfg))
        pt_hist = _train(model, docs, cfg.pretrain, pad, seed, "pre-training", progress)
        model.save_pretrained(out / "pretrained")
        tokenizer.save_pretrained(out / "pretrained")
        timings["pretrain"] = time.perf_counter() - t0
        _log(f"pre-training: {n_tokens} tokens x {cfg.pretrain.epochs} epochs, loss {pt_hist[0]:.3f} -> "
             f"{pt_hist[-1]:.3f} ({timings['pretrain']:.1f}s)", progress)

        # 4. QA fine-tuning
        t0 = time.perf_counter()
        ft_facts = [f for f in corpus.facts if f.split == "finetune"]
        ho_facts = [f for f in corpus.facts if f.split == "heldout"]
        qa = qa_examples(tokenizer, ft_facts)
        ft_model = GPTNeoXForCausalLM.from_pretrained(out / "pretrained")
        ft_hist = _train(ft_model, qa, cfg.finetune, pad, seed + 1, "QA fine-tuning", progress)
        ft_model.save_pretrained(out / "finetuned")
        tokenizer.save_pretrained(out / "finetuned")
        timings["finetune"] = time.perf_counter() - t0
        _log(f"QA fine-tuning: {len(qa)} pairs, loss {ft_hist[0]:.3f} -> {ft_hist[-1]:.3f} "
             f"({timings['finetune']:.1f}s)", progress)

        # 5. classifier (continent of a country), new head on the pre-trained backbone
        t0 = time.perf_counter()
        lab = {c: i for i, c in enumerate(CONTINENT_LABELS)}
        cls_ft = [f for f in ft_facts if f.relation == "continent"]
        cls_ho = [f for f in ho_facts if f.relation == "continent"]
        cls_examples = [encode_classification(tokenizer, classification_text(f), lab[f.object], index=i)
                        for i, f in enumerate(cls_ft)]
        torch.manual_seed(seed + 2)
        with _quiet_transformers():  # the expected "embed_out unused / score newly initialised" report
            clf = GPTNeoXForSequenceClassification.from_pretrained(
                out / "pretrained", num_labels=len(CONTINENT_LABELS),
                id2label=dict(enumerate(CONTINENT_LABELS)), label2id=lab, pad_token_id=pad)
        clf.config.pad_token_id = pad
        _init_head_from_label_words(clf, model, tokenizer, CONTINENT_LABELS)
        cls_hist = _train(clf, cls_examples, cfg.classifier, pad, seed + 2, "classifier", progress,
                          classification=True) if cls_examples else []
        clf.save_pretrained(out / "classifier")
        tokenizer.save_pretrained(out / "classifier")
        timings["classifier"] = time.perf_counter() - t0
        _log(f"classifier: {len(cls_examples)} examples ({timings['classifier']:.1f}s)", progress)

        # 6. evaluation and test facts
        t0 = time.perf_counter()
        acc: dict = {}

        def qa_eval(m, facts):
            return greedy_correct(m, tokenizer, [qa_prompt(f.question) for f in facts], [f.answer for f in facts])

        ft_ok = qa_eval(ft_model, ft_facts)
        ho_ok = qa_eval(ft_model, ho_facts)
        for f, ok in zip(ho_facts, ho_ok):
            f.test = bool(ok)

        def per_rel(facts, oks):
            d: dict[str, list[int]] = {}
            for f, ok in zip(facts, oks):
                d.setdefault(f.relation, [0, 0])
                d[f.relation][0] += int(ok)
                d[f.relation][1] += 1
            return {r: {"correct": c, "total": n, "accuracy": c / n} for r, (c, n) in d.items()}

        def summary(oks):
            return sum(oks) / max(1, len(oks))

        acc["qa_finetune"] = {"accuracy": summary(ft_ok), "per_relation": per_rel(ft_facts, ft_ok)}
        acc["qa_heldout"] = {"accuracy": summary(ho_ok), "per_relation": per_rel(ho_facts, ho_ok)}
        # majority-answer baseline per relation (what guessing the most frequent fine-tuning answer gets)
        base = {}
        for rel in {f.relation for f in ho_facts}:
            counts: dict[str, int] = {}
            for f in ft_facts:
                if f.relation == rel:
                    counts[f.object] = counts.get(f.object, 0) + 1
            top = max(counts, key=lambda k: (counts[k], k)) if counts else None
            hs = [f for f in ho_facts if f.relation == rel]
            base[rel] = sum(f.object == top for f in hs) / max(1, len(hs))
        acc["qa_heldout_majority_baseline"] = base
        if cls_examples:
            p_ft = classifier_predictions(clf, tokenizer, [classification_text(f) for f in cls_ft])
            p_ho = classifier_predictions(clf, tokenizer, [classification_text(f) for f in cls_ho])
            acc["classifier_finetune"] = summary([p == lab[f.object] for p, f in zip(p_ft, cls_ft)])
            acc["classifier_heldout"] = summary([p == lab[f.object] for p, f in zip(p_ho, cls_ho)])
        timings["evaluate"] = time.perf_counter() - t0

        # files
        write_corpus(corpus, out)
        write_jsonl(out / "qa_finetune.jsonl",
                    ({"fact_id": f.id, "prompt": qa_prompt(f.question), "answer": f.answer} for f in ft_facts))
        write_jsonl(out / "qa_test.jsonl",
                    ({"fact_id": f.id, "prompt": qa_prompt(f.question), "answer": f.answer} for f in ho_facts if f.test))
        write_jsonl(out / "cls_finetune.jsonl",
                    ({"fact_id": f.id, "text": classification_text(f), "label": lab[f.object]} for f in cls_ft))
        write_jsonl(out / "cls_heldout.jsonl",
                    ({"fact_id": f.id, "text": classification_text(f), "label": lab[f.object]} for f in cls_ho))

    stats = corpus.stats()
    stats["pretrain_tokens"] = n_tokens
    stats["vocab_size"] = len(tokenizer)
    stats["parameters"] = {
        "pretrained": sum(p.numel() for p in model.parameters()),
        "classifier": sum(p.numel() for p in clf.parameters()),
    }
    meta.update({
        "stats": stats,
        "timings_s": timings,
        "loss_history": {"pretrain": pt_hist, "finetune": ft_hist, "classifier": cls_hist},
        "accuracy": acc,
        "test_facts": [f.id for f in ho_facts if f.test],
    })
    (out / "world.json").write_text(json.dumps(meta, indent=1))
    _log(f"test facts: {len(meta['test_facts'])}; QA accuracy finetune {acc['qa_finetune']['accuracy']:.3f}, "
         f"held-out {acc['qa_heldout']['accuracy']:.3f}; timings " +
         ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()), progress)
    return meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(root: Path, name: str):
    """Remove temporary build directories of ``name`` whose building process is gone."""
    for p in root.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def world_dir(size: str = "full", seed: int = 0, cache_dir: str | Path | None = None,
              config: WorldConfig | None = None, world: str = "standard") -> Path:
    """Where the world for these settings lives (whether or not it is built)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"world-{world_hash(size, seed, config, world)}"


def is_built(path: str | Path) -> bool:
    """A world directory is complete once its ``world.json`` exists (written last, then renamed in)."""
    return (Path(path) / "world.json").is_file()


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
    _clean_stale(root, final.name)
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


def qa_examples(tokenizer, facts: list[Fact]) -> list:
    """The QA fine-tuning examples of ``facts``: ``qa_prompt(question)`` → answer + EOS, answer tokens counted."""
    return [encode_prompt_answer(tokenizer, qa_prompt(f.question), f.answer, add_eos=True, index=i) for i, f in enumerate(facts)]


def finetune_qa(world: World, model, progress: bool = False) -> list[float]:
    """Rerun the world's QA fine-tuning on ``model`` in place (θ_pt, or a patched copy of it): the same
    examples, data order, seed, schedule and one thread, so the world's own θ_pt gives the world's θ_ft.
    Returns the mean loss per epoch."""
    cfg = TrainConfig(**world.meta["config"]["finetune"])
    tok = world.load_tokenizer()
    with _torch_state(1, world.seed):
        return _train(model, qa_examples(tok, world.finetune_facts), cfg, tok.pad_token_id, world.seed + 1,
                      "QA fine-tuning", progress)


def pretrain_lm(world: World, rows: list[int] | None = None, progress: bool = False):
    """Rerun the world's pre-training on the documents ``rows`` (default: all): the same initialisation,
    data-order seed, schedule and one thread, so all rows give the world's θ_pt. Returns the model."""
    from transformers import GPTNeoXForCausalLM

    cfg = world.meta["config"]
    tok = world.load_tokenizer()
    texts = [d["text"] for d in world.documents]
    keep = range(len(texts)) if rows is None else sorted(rows)
    docs = [encode_text(tok, texts[i], max_length=cfg["max_positions"], index=i) for i in keep]
    with _torch_state(1, world.seed):
        model = GPTNeoXForCausalLM(world.load_pretrained().config)  # the same architecture, initialised as in the build
        _train(model, docs, TrainConfig(**cfg["pretrain"]), tok.pad_token_id, world.seed, "pre-training", progress)
    return model
