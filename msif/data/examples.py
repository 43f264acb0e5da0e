"""Turning corpus records into batches of encoded examples for an objective.

:class:`ExampleBatches` is re-iterable (each iteration streams the file again), so the two passes of
an EK-FAC fit read the data twice without holding it in memory. Within a window of records the
examples are sorted by length before batching, which cuts padding; results do not depend on it (labels
are sampled per example, statistics are sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .corpus import iter_records
from .encoding import Batch, Encoded, InputError, collate, encode_classification, encode_prompt_answer, encode_text, pad_token_id


@dataclass
class Fields:
    """Field names of a dataset's records (overridable from the CLI)."""

    text: str = "text"
    prompt: str = "prompt"
    answer: str = "answer"
    label: str = "label"


def encode_record(tokenizer, record: dict, objective: str, fields: Fields, index: int, max_length=None, truncate=False) -> Encoded:
    """Encode one record for ``objective`` (``lm``, ``answer`` or ``classification``)."""

    def get(name):
        if name not in record:
            raise InputError(
                f"row {index} has no field {name!r} (fields: {', '.join(sorted(record))}); name the right field "
                f"with --{_flag(name, fields)}-field"
            )
        return record[name]

    if objective == "lm":
        return encode_text(tokenizer, get(fields.text), max_length=max_length, truncate=truncate, index=index)
    if objective == "answer":
        return encode_prompt_answer(tokenizer, get(fields.prompt), get(fields.answer), max_length=max_length, index=index)
    if objective == "classification":
        return encode_classification(tokenizer, get(fields.text), get(fields.label), max_length=max_length, truncate=truncate, index=index)
    raise ValueError(f"unknown objective {objective!r}")


def _flag(name: str, fields: Fields) -> str:
    for k, v in vars(fields).items():
        if v == name:
            return k
    return name


def _with_field_hint(records):
    try:
        yield from records
    except InputError as e:
        if "field" in str(e):
            raise InputError(f"{e} (CLI: name the field with --text-field, --prompt-field, --answer-field or --label-field)") from None
        raise


class ExampleBatches:
    """Re-iterable stream of :class:`Batch` from a JSONL / Parquet / ``datasets`` file."""

    def __init__(
        self,
        path,
        tokenizer,
        objective: str,
        batch_size: int = 8,
        fields: Fields | None = None,
        max_examples: int | None = None,
        max_length: int | None = None,
        truncate: bool = False,
        window: int = 64,
    ):
        self.path = path
        self.tokenizer = tokenizer
        self.objective = objective
        self.batch_size = batch_size
        self.fields = fields or Fields()
        self.max_examples = max_examples
        self.max_length = max_length
        self.truncate = truncate
        self.window = max(1, window) * batch_size
        self.pad_id = pad_token_id(tokenizer)

    def num_examples(self) -> int:
        """Examples one iteration yields (the file's rows, at most ``max_examples``), without tokenising."""
        from .corpus import open_corpus

        n = len(open_corpus(self.path, text_field=None, id_field=None))
        return n if self.max_examples is None else min(n, self.max_examples)

    def _field_list(self):
        f = self.fields
        return {"lm": [f.text], "answer": [f.prompt, f.answer], "classification": [f.text, f.label]}[self.objective]

    def __iter__(self) -> Iterator[Batch]:
        buf: list[Encoded] = []
        n = 0
        records = iter_records(self.path, fields=self._field_list(), limit=self.max_examples)
        for i, rec in enumerate(_with_field_hint(records)):
            buf.append(encode_record(self.tokenizer, rec, self.objective, self.fields, i, self.max_length, self.truncate))
            n += 1
            if len(buf) >= self.window:
                yield from self._flush(buf)
                buf = []
        if buf:
            yield from self._flush(buf)
        if n == 0:
            raise InputError(f"{self.path} has no rows to fit on")

    def _flush(self, buf: list[Encoded]) -> Iterator[Batch]:
        buf = sorted(buf, key=lambda e: len(e.input_ids))
        for j in range(0, len(buf), self.batch_size):
            yield collate(buf[j : j + self.batch_size], pad_id=self.pad_id)
