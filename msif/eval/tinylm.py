"""The studies' tiny language-model kit: sentences, a word-level vocabulary, a tiny GPT-NeoX, training,
losses, batches, per-example gradients and factor fits on replicated examples.

Used by the scalability study (:mod:`msif.eval.scalability`), the LDS (:mod:`msif.eval.lds`) and the
EK-FAC accuracy study (:mod:`msif.eval.ekfac_accuracy`), so each of these pieces exists once.
"""

from __future__ import annotations

import collections
import math
import random
import re
from dataclasses import dataclass

import torch

from ..curvature.exact import from_modules
from ..curvature.factors import FactorSet
from ..curvature.fit import FitConfig, fit_factors
from ..curvature.hooks import per_example_grads
from ..data.encoding import Batch, Encoded, collate
from ..objectives import data_targets, model_logits, summed_loss
from .timer import Timer

# --------------------------------------------------------------------------------------------------
# Text: corpus sentences and a word-level vocabulary

_WORD = re.compile(r"\w+|[^\w\s]")
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
UNK = 3


def corpus_sentences(countries: int, seed: int = 0) -> list[str]:
    """Unique sentences of the world-facts corpus for ``countries`` countries, shuffled by ``seed``."""
    from ..worldfacts.corpus import CorpusConfig, build_corpus

    c = build_corpus(seed, CorpusConfig(max_countries=countries, max_cities=countries, n_paraphrases=3))
    sents = sorted({s.strip() for d in c.documents for s in re.split(r"(?<=\.)\s+", d["text"]) if s.strip()})
    random.Random(seed).shuffle(sents)
    return sents


def words(sentence: str) -> list[str]:
    return _WORD.findall(sentence.lower())


class WordVocab:
    """Lower-cased word-level vocabulary: ``[PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3``, then words seen at
    least ``min_count`` times in ``sentences`` (most frequent first)."""

    def __init__(self, sentences: list[str], min_count: int = 2):
        cnt = collections.Counter(w for s in sentences for w in words(s))
        kept = sorted((w for w, n in cnt.items() if n >= min_count), key=lambda w: (-cnt[w], w))
        self.itos = list(SPECIALS) + kept
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def ids(self, sentence: str) -> list[int]:
        return [self.stoi.get(w, UNK) for w in words(sentence)]

    def encode(self, sentence: str, index: int = 0) -> Encoded:
        ids = [1] + self.ids(sentence) + [2]
        return Encoded(ids, [True] * (len(ids) - 1) + [False], index=index)


@dataclass
class TextData:
    vocab: WordVocab
    train: list[Encoded]
    heldout: list[Encoded]
    train_text: list[str]
    heldout_text: list[str]


def make_data(countries: int, min_count: int = 2, heldout_fraction: float = 0.1, seed: int = 0) -> TextData:
    """Corpus sentences, a held-out share of them, and the vocabulary of the rest."""
    sents = corpus_sentences(countries, seed)
    n_held = max(1, int(round(heldout_fraction * len(sents))))
    held, train = sents[:n_held], sents[n_held:]
    vocab = WordVocab(train, min_count)
    return TextData(
        vocab,
        [vocab.encode(s, i) for i, s in enumerate(train)],
        [vocab.encode(s, i) for i, s in enumerate(held)],
        train,
        held,
    )


def batches(examples: list[Encoded], size: int) -> list[Batch]:
    """Padded batches of ``size`` consecutive examples."""
    return [collate(examples[i : i + size]) for i in range(0, len(examples), size)]


def replicated(examples: list[Encoded], R: int) -> list[Encoded]:
    """``R`` copies of each example under distinct dataset indices (fresh sampled labels per copy)."""
    n = len(examples)
    return [Encoded(e.input_ids, e.target_mask, index=r * n + i) for r in range(R) for i, e in enumerate(examples)]


# --------------------------------------------------------------------------------------------------
# Model, losses, training


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, seed: int = 0, *,
                max_positions: int = 64, bos_id: int = 1, eos_id: int = 2, dtype: torch.dtype = torch.float32):
    """A GPT-NeoX LM (no dropout, SDPA attention: float64 softmax throughout when in float64), initialised
    from ``seed``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    mc = GPTNeoXConfig(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=intermediate,
        vocab_size=vocab_size, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=bos_id,
        eos_token_id=eos_id, hidden_dropout=0.0, attention_dropout=0.0, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(mc)
    if dtype == torch.float64:
        model = model.double()
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        model.config._attn_implementation = "sdpa"
    return model


def token_nll(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over counted positions, and their number."""
    loss = summed_loss(model_logits(model, batch), data_targets(batch, "lm")).sum()
    return loss, int(batch.target_mask.sum())


def mean_token_loss(model, data: list[Batch]) -> float:
    """Mean next-token cross-entropy over every counted position of ``data`` (eval mode, restored)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in data:
            l, k = token_nll(model, b)
            tot, n = tot + float(l), n + k
    model.train(was)
    return tot / max(n, 1)


def mean_entropy(model, data: list[Batch]) -> float:
    """Mean entropy (nats) of the model's next-token distribution over the counted positions."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in data:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
            tot += float(ent[b.target_mask].sum())
            n += int(b.target_mask.sum())
    return tot / n


def sequence_losses(model, examples: list[Encoded], batch_size: int = 128) -> torch.Tensor:
    """Summed next-token loss of each example ``(N,)`` (the measurement ``m`` of a query)."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for b in batches(examples, batch_size):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            out.append(summed_loss(logits.double(), data_targets(b, "lm")))
    model.train(was)
    return torch.cat(out)


def _step(model, opt, sched, batch: Batch) -> None:
    """One optimiser step on the batch's mean token loss."""
    loss, n = token_nll(model, batch)
    opt.zero_grad()
    (loss / n).backward()
    opt.step()
    sched.step()


def _warmup_cosine(total: int):
    """Learning-rate factor: linear warm-up over 5% of ``total`` steps, then cosine decay to 10%."""
    warm = max(1, int(0.05 * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    return factor


def train_lm(model, train: list[Encoded], epochs: int, lr: float, batch_size: int, seed: int = 0,
             heldout: list[Encoded] | None = None, record: bool = True, snapshots: dict | None = None) -> dict:
    """AdamW on the mean token loss (linear warm-up 5%, cosine decay to 10%), shuffled minibatches.

    Returns the curve: the mean token loss of the whole training set (and of ``heldout``) after each
    epoch, plus ``converged`` (the last 5 epochs changed the training loss by < 1%). ``snapshots``
    (epoch → None) gets each listed epoch's weights (a ``state_dict`` copy) filled in."""
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(epochs * math.ceil(len(train) / batch_size)))
    curve = {"epoch": [], "train_loss": [], "heldout_loss": []}

    def point(ep: int) -> None:
        curve["epoch"].append(ep)
        curve["train_loss"].append(mean_token_loss(model, batches(train, 128)))
        curve["heldout_loss"].append(mean_token_loss(model, batches(heldout, 128)) if heldout else None)

    if record:
        point(0)
    model.train()
    with Timer() as t:
        for ep in range(1, epochs + 1):
            order = torch.randperm(len(train), generator=g).tolist()
            for i in range(0, len(order), batch_size):
                _step(model, opt, sched, collate([train[j] for j in order[i : i + batch_size]]))
            if snapshots is not None and ep in snapshots:
                snapshots[ep] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if record and (ep == epochs or ep % max(1, epochs // 10) == 0):
                point(ep)
        model.eval()
    curve["time_s"] = t.s
    if record and len(curve["train_loss"]) >= 3:
        curve.update(_convergence(curve["epoch"], curve["train_loss"]))
    return curve


def _convergence(ep: list[int], tl: list[float]) -> dict:
    """The training loss's relative change over the last ≥ 5 recorded epochs; converged below 1%."""
    j = max([i for i, e in enumerate(ep) if e <= ep[-1] - 5] or [0])  # the recorded point ≥ 5 epochs back
    change = abs(tl[j] - tl[-1]) / max(abs(tl[-1]), 1e-12)
    return dict(last_rel_change=change, last_rel_change_epochs=ep[-1] - ep[j], converged=change < 0.01)


def train_steps(model, train: list[Encoded], steps: int, batch_size: int, lr: float, seed: int,
                evaluate: list[Batch]) -> list[tuple[int, float]]:
    """Adam (cosine annealing to 5% of ``lr``) on random minibatches of ``train`` for ``steps`` steps;
    returns ``(step, mean token loss of evaluate)`` at the start and 8 times along."""
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    model.train()
    curve = [(0, mean_token_loss(model, evaluate))]
    every = max(1, steps // 8)
    for step in range(1, steps + 1):
        idx = torch.randperm(len(train), generator=g)[:batch_size].tolist()
        _step(model, opt, sched, collate([train[i] for i in idx]))
        if step % every == 0 or step == steps:
            curve.append((step, mean_token_loss(model, evaluate)))
    model.eval()
    return curve


# --------------------------------------------------------------------------------------------------
# Gradients and factors


def example_grads(model, tms, examples: list[Encoded], batch_size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example gradients of the summed LM loss (data labels), float64: flat ``(B, D)`` in
    :func:`msif.curvature.exact.param_layout` order, and per module ``(B, out, in_dim)``."""
    mods: dict[str, list[torch.Tensor]] = {tm.name: [] for tm in tms}
    for b in batches(examples, batch_size):
        g = per_example_grads(model, tms, b, "lm")
        for n in mods:
            mods[n].append(g[n].double())
    per = {n: torch.cat(v) for n, v in mods.items()}
    return from_modules(per, tms), per


def fit(model, examples: list[Encoded], R: int, config: FitConfig, batch_size: int = 64,
        fingerprint: str = "tinylm") -> FactorSet:
    """Factors of ``config`` fitted on ``R`` copies of every example (fresh sampled labels per copy), in
    batches of ``batch_size``; the identity strategy needs no data beyond one example."""
    data = batches(replicated(examples, R), batch_size) if config.strategy != "identity" else batches(examples[:1], 1)
    return fit_factors(model, data, config, fingerprint=fingerprint)
