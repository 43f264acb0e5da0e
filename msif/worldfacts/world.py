"""The handle of a built world on disk: its paths, documents, facts and models (see the directory
layout in :mod:`msif.worldfacts.build`)."""

from __future__ import annotations

import json
from pathlib import Path

from msif.worldfacts.facts import Fact
from msif.worldfacts.jsonl import read_jsonl
from msif.worldfacts.qa import CONTINENT_LABELS, qa_prompt


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
