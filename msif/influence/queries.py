"""Queries to the fine-tuned model: the template, a greedy answer when none is given (or the predicted
class of a classifier), the encoding, and the query gradients ``∇m(θ_ft)`` with
``m = −log p(answer | prompt)`` (docs/method.md §3).

:class:`QueryPreparation` is the part of :class:`~msif.influence.attribute.Attributor` that reads
``ft``, ``ft_tok``, ``template``, ``max_length``, ``max_new_tokens``, ``device``, ``classifier``,
``batch_size`` and ``shared`` from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..curvature.hooks import per_example_factors
from ..curvature.precondition import Factored
from ..data.encoding import Encoded, InputError, collate, encode_classification, encode_prompt, encode_prompt_answer, pad_token_id


@dataclass
class Query:
    """A question to the fine-tuned model: ``prompt`` and its ``answer`` (None: greedy-decode one).

    For a classification fine-tune, ``label`` (None: the model's predicted class) replaces the answer.
    """

    prompt: str
    answer: str | None = None
    label: int | None = None
    id: str | None = None


@dataclass
class PreparedQuery:
    query: Query
    prompt_text: str  # after the template
    answer: str | None
    label: int | None
    encoded: Encoded
    generated: bool = False


class QueryPreparation:
    """Turning :class:`Query` objects into encoded, answered :class:`PreparedQuery` objects and gradients."""

    def _prompt_text(self, prompt: str) -> str:
        if self.template == "plain":
            return prompt
        if not getattr(self.ft_tok, "chat_template", None):
            raise InputError("the fine-tuned tokenizer has no chat template; use template='plain' (CLI: --template plain)")
        return self.ft_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, prompt_text: str) -> tuple[Encoded, str]:
        """Greedy-decode an answer from the fine-tuned model; returns the encoded pair and its text."""
        if self.classifier:
            raise InputError("a classification model does not generate text")
        prompt_ids = encode_prompt(self.ft_tok, prompt_text)
        if not prompt_ids:
            raise InputError("the prompt is empty")
        n_prompt = len(prompt_ids)
        room = self.max_new_tokens if self.max_length is None else min(self.max_new_tokens, self.max_length - n_prompt)
        if room < 1:
            raise InputError(f"the prompt is {n_prompt} tokens long, leaving no room for an answer within max_length={self.max_length}")
        ids = torch.tensor([prompt_ids], device=self.device)
        eos = self.ft_tok.eos_token_id
        out = self.ft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=room, do_sample=False,
                               pad_token_id=pad_token_id(self.ft_tok), eos_token_id=eos)
        new = out[0, n_prompt:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        text = self.ft_tok.decode(new)
        if "\n" in text:  # stop at the end of the line
            text = text[: text.index("\n")]
            new = self.ft_tok(text, add_special_tokens=False)["input_ids"]
        if not text.strip() or not new:
            raise InputError(f"the fine-tuned model generated an empty answer to {prompt_text!r}; give an answer explicitly")
        ids_all = prompt_ids + new
        tm = [False] * len(ids_all)
        for t in range(n_prompt - 1, len(ids_all) - 1):
            tm[t] = True
        return Encoded(ids_all, tm), text

    def prepare(self, queries: Sequence[Query]) -> list[PreparedQuery]:
        """Apply the template, generate missing answers (or predict missing labels), encode."""
        if not queries:
            raise InputError("no queries given")
        out = []
        for i, q in enumerate(queries):
            if not isinstance(q.prompt, str) or not q.prompt.strip():
                raise InputError(f"query {i}: the prompt is empty")
            pt = self._prompt_text(q.prompt)
            if self.classifier:
                label = q.label
                if label is None:
                    enc = encode_classification(self.ft_tok, pt, 0, max_length=self.max_length, index=i)
                    with torch.no_grad():
                        b = collate([enc], pad_id=pad_token_id(self.ft_tok)).to(self.device)
                        label = int(self.ft(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.argmax(-1))
                n_labels = self.ft.config.num_labels
                if not 0 <= int(label) < n_labels:
                    raise InputError(f"query {i}: label {label} is outside the classifier's {n_labels} classes")
                enc = encode_classification(self.ft_tok, pt, int(label), max_length=self.max_length, index=i)
                out.append(PreparedQuery(q, pt, None, int(label), enc, generated=q.label is None))
                continue
            if q.answer is None:
                enc, ans = self.generate(pt)
                enc.index = i
                out.append(PreparedQuery(q, pt, ans, None, enc, generated=True))
            else:
                enc = encode_prompt_answer(self.ft_tok, pt, q.answer, max_length=self.max_length, index=i)
                out.append(PreparedQuery(q, pt, q.answer, None, enc))
        return out

    def query_gradients(self, prepared: list[PreparedQuery], factored: bool = False) -> dict:
        """``∇m(θ_ft)`` per shared module, ``(Q, out, in_dim)``, ``m = −log p(answer | prompt)``;
        with ``factored``, as :class:`~msif.curvature.precondition.Factored` ``s_qᵀ a_q`` for modules
        where that is smaller than the dense matrix."""
        objective = "classification" if self.classifier else "answer"
        parts: dict[str, list] = {}
        for i in range(0, len(prepared), self.batch_size):
            b = collate([p.encoded for p in prepared[i : i + self.batch_size]], pad_id=pad_token_id(self.ft_tok)).to(self.device)
            for n, f in per_example_factors(self.ft, self.shared, b, objective).items():
                if not (torch.isfinite(f.s).all() and torch.isfinite(f.a).all()):
                    raise FloatingPointError("the query gradient is NaN or infinite: check the fine-tuned model")
                parts.setdefault(n, []).append(f)
        out = {}
        for n, fs in parts.items():
            f = Factored.cat(fs)
            out[n] = f if factored and f.worth_it() else torch.cat([x.dense() for x in fs])
        return out
