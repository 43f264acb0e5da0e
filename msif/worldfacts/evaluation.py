"""How well the world's models learnt: exact greedy QA correctness, classifier predictions, and the
accuracy summaries recorded in ``world.json``."""

from __future__ import annotations

import torch

from msif.data.encoding import collate, encode_classification, encode_prompt_answer
from msif.worldfacts.facts import Fact
from msif.worldfacts.qa import qa_prompt


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


def qa_correct(model, tokenizer, facts: list[Fact]) -> list[bool]:
    """Whether greedy decoding after each fact's QA prompt gives exactly its answer, then EOS."""
    return greedy_correct(model, tokenizer, [qa_prompt(f.question) for f in facts], [f.answer for f in facts])


def share(oks) -> float:
    """The share of true values (0 for none)."""
    return sum(oks) / max(1, len(oks))


def per_relation_accuracy(facts: list[Fact], oks: list[bool]) -> dict[str, dict]:
    """Relation -> ``{"correct", "total", "accuracy"}``, relations in order of first appearance."""
    d: dict[str, list[int]] = {}
    for f, ok in zip(facts, oks):
        d.setdefault(f.relation, [0, 0])
        d[f.relation][0] += int(ok)
        d[f.relation][1] += 1
    return {r: {"correct": c, "total": n, "accuracy": c / n} for r, (c, n) in d.items()}


def majority_baseline(finetune: list[Fact], heldout: list[Fact]) -> dict[str, float]:
    """Per relation: the held-out accuracy of always answering the most frequent fine-tuning answer."""
    base = {}
    for rel in sorted({f.relation for f in heldout}):  # sorted: world.json does not depend on the hash seed
        counts: dict[str, int] = {}
        for f in finetune:
            if f.relation == rel:
                counts[f.object] = counts.get(f.object, 0) + 1
        top = max(counts, key=lambda k: (counts[k], k)) if counts else None
        hs = [f for f in heldout if f.relation == rel]
        base[rel] = sum(f.object == top for f in hs) / max(1, len(hs))
    return base
