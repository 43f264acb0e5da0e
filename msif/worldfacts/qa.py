"""The fine-tuning tasks' data: the QA prompt, QA examples, the continent classifier's texts and labels."""

from __future__ import annotations

from msif.data.encoding import encode_classification, encode_prompt_answer
from msif.worldfacts.facts import Fact

CONTINENT_LABELS = ["Africa", "Asia", "Europe", "North America", "Oceania", "South America"]


def qa_prompt(question: str) -> str:
    """The exact prompt used for QA fine-tuning; the answer (with its leading space) follows it."""
    return f"Question: {question}\nAnswer:"


def classification_text(fact: Fact) -> str:
    """The classifier's input for a continent fact (the fact's question)."""
    return fact.question


def qa_examples(tokenizer, facts: list[Fact]) -> list:
    """The QA fine-tuning examples of ``facts``: ``qa_prompt(question)`` → answer + EOS, answer tokens counted."""
    return [encode_prompt_answer(tokenizer, qa_prompt(f.question), f.answer, add_eos=True, index=i) for i, f in enumerate(facts)]


def classification_examples(tokenizer, facts: list[Fact], labels: dict[str, int]) -> list:
    """The classifier's examples of continent ``facts``: question → label index of the continent."""
    return [encode_classification(tokenizer, classification_text(f), labels[f.object], index=i)
            for i, f in enumerate(facts)]


def qa_rows(facts: list[Fact]):
    """``{"fact_id", "prompt", "answer"}`` rows of ``facts`` (``qa_finetune.jsonl``, ``qa_test.jsonl``)."""
    return ({"fact_id": f.id, "prompt": qa_prompt(f.question), "answer": f.answer} for f in facts)


def classification_rows(facts: list[Fact], labels: dict[str, int]):
    """``{"fact_id", "text", "label"}`` rows of continent ``facts`` (``cls_finetune.jsonl``, ``cls_heldout.jsonl``)."""
    return ({"fact_id": f.id, "text": classification_text(f), "label": labels[f.object]} for f in facts)
