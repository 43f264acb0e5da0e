"""Tokenisation with masks, and padding into batches.

Conventions used everywhere in msif:

* ``input_ids[t]`` is token ``t``; the logits at position ``t`` predict token ``t + 1``.
* ``target_mask[t]`` is True where the prediction made at position ``t`` (of token ``t + 1``) counts
  in the loss. The last position never counts. Padding never counts.
* ``attention_mask[t]`` is 1 for real tokens and 0 for padding (right padding).

An example is an :class:`Encoded` (unpadded); :func:`collate` pads a list of them into a :class:`Batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MsifError


class InputError(MsifError, ValueError):
    """Bad user input (empty answer, over-long sequence, missing field...). The message says the fix."""


@dataclass
class Encoded:
    """One tokenised example. ``target_mask`` has the same length as ``input_ids``."""

    input_ids: list[int]
    target_mask: list[bool]
    label: int | None = None
    index: int = 0  # position of the example in its dataset (seeds per-example label sampling)

    def __post_init__(self):
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError("input_ids and target_mask differ in length")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    target_mask: torch.Tensor  # (B, T) bool
    labels: torch.Tensor | None  # (B,) long, for classification
    indices: torch.Tensor  # (B,) long, dataset positions

    def to(self, device) -> "Batch":
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            None if self.labels is None else self.labels.to(device),
            self.indices,
        )

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def head(self, n: int) -> "Batch":
        """The first ``n`` examples."""
        return Batch(self.input_ids[:n], self.attention_mask[:n], self.target_mask[:n],
                     None if self.labels is None else self.labels[:n], self.indices[:n])


def _check_length(n: int, max_length: int | None, what: str):
    if max_length is not None and n > max_length:
        raise InputError(
            f"{what} is {n} tokens long, over max_length={max_length}. Shorten it, raise max_length "
            "(CLI: --max-length) up to the model's context size, or pass truncate=True (CLI: --truncate)."
        )


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    """The BOS token for tokenizers that prepend one (Llama family); none for GPT-2/NeoX/BLOOM style."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id:
        return [ids[0]]
    return []


def encode_text(tokenizer, text: str, max_length: int | None = None, truncate: bool = False, index: int = 0) -> Encoded:
    """A pre-training document: every next-token prediction counts."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"example {index}: the text is empty; drop empty documents from the corpus")
    ids = _bos(tokenizer) + _ids(tokenizer, text)
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            _check_length(len(ids), max_length, f"example {index}")
        ids = ids[:max_length]
    if len(ids) < 2:
        raise InputError(f"example {index}: a document needs at least 2 tokens to have a next-token loss")
    return Encoded(ids, [True] * (len(ids) - 1) + [False], index=index)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as :func:`encode_prompt_answer` lays it out (BOS, if any, then the prompt)."""
    return _bos(tokenizer) + _ids(tokenizer, prompt)


def encode_prompt_answer(
    tokenizer,
    prompt: str,
    answer: str,
    max_length: int | None = None,
    add_eos: bool = False,
    index: int = 0,
) -> Encoded:
    """Prompt followed by answer; only the answer tokens count (prompt tokens are masked).

    The prompt and the answer are tokenised separately and concatenated, so the answer's tokens are the
    same whatever the prompt. Give the answer with its leading space if the text has one (" Paris").
    """
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(
            f"example {index}: the answer is empty. Give the answer to attribute (CLI: --answer), or leave it "
            "out entirely to have the model generate one by greedy decoding."
        )
    if not isinstance(prompt, str):
        raise InputError(f"example {index}: the prompt must be a string")
    p = _bos(tokenizer) + _ids(tokenizer, prompt)
    a = _ids(tokenizer, answer)
    if add_eos and tokenizer.eos_token_id is not None:
        a = a + [tokenizer.eos_token_id]
    if not p:
        raise InputError(f"example {index}: the prompt is empty and the tokenizer adds no BOS token to condition on")
    ids = p + a
    _check_length(len(ids), max_length, f"example {index} (prompt + answer)")
    # position t predicts token t+1: answer token j (at position len(p)+j) is predicted at len(p)+j-1
    tm = [False] * len(ids)
    for t in range(len(p) - 1, len(ids) - 1):
        tm[t] = True
    return Encoded(ids, tm, index=index)


def encode_classification(
    tokenizer, text: str, label: int, max_length: int | None = None, truncate: bool = False, index: int = 0
) -> Encoded:
    """An input for a sequence-classification model; no token-level loss."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"example {index}: the text is empty")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise InputError(f"example {index}: label {label!r} is not an integer class id") from None
    ids = _bos(tokenizer) + _ids(tokenizer, text)
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            _check_length(len(ids), max_length, f"example {index}")
        ids = ids[:max_length]
    return Encoded(ids, [False] * len(ids), label=label, index=index)


def collate(examples: list[Encoded], pad_id: int = 0, pad_to: int | None = None) -> Batch:
    """Right-pad a list of examples into a batch."""
    if not examples:
        raise InputError("cannot collate an empty list of examples")
    T = max(len(e.input_ids) for e in examples)
    if pad_to is not None:
        T = max(T, pad_to)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    am = torch.zeros((B, T), dtype=torch.long)
    tm = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        am[i, :n] = 1
        tm[i, :n] = torch.tensor(e.target_mask, dtype=torch.bool)
    labels = None
    if examples[0].label is not None:
        if any(e.label is None for e in examples):
            raise InputError("a batch mixes examples with and without labels")
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    idx = torch.tensor([e.index for e in examples], dtype=torch.long)
    return Batch(ids, am, tm, labels, idx)


def pad_token_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0
