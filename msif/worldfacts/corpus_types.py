"""The world corpus's settings (:class:`CorpusConfig`) and what a build returns (:class:`WorldCorpus`),
shared by the standard builder (:mod:`msif.worldfacts.corpus`) and the hard one (:mod:`msif.worldfacts.hard`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from msif.worldfacts.facts import Fact
from msif.worldfacts.templates import RELATIONS


@dataclass
class CorpusConfig:
    """Size knobs for the corpus.

    ``max_countries`` / ``max_cities`` cap the entities (None: all clean ones; cities are taken by
    population). ``n_paraphrases`` statements per fact, each with a different template and in a
    different document. ``mixed_fraction`` of statements go to documents mixing several subjects, the
    rest to documents about one subject. ``finetune_fraction`` of each relation's facts are used for
    QA fine-tuning; the rest are held out.
    """

    max_countries: int | None = None
    max_cities: int | None = 400
    max_cities_per_country: int = 20
    min_city_population: int = 300_000
    relations: tuple[str, ...] = tuple(RELATIONS)
    n_paraphrases: int = 5
    mixed_fraction: float = 0.3
    finetune_fraction: float = 0.5
    mention_docs_per_subject: int = 1
    filler_prob: float = 0.5
    #: "standard" (this module) or "hard" (:mod:`msif.worldfacts.hard`); left out of the world's
    #: configuration record and hash when "standard", so standard worlds keep their cache directory.
    style: str = "standard"


@dataclass
class WorldCorpus:
    """The pre-training documents (``{"id", "text", "facts", "mentions"}``) and facts of one world.

    Not to be confused with :class:`msif.data.corpus.Corpus`, the reader of corpus files on disk.
    """

    documents: list[dict]
    facts: list[Fact]
    config: CorpusConfig
    seed: int
    #: hard world only: entity name -> the phrases that refer to it without its name (aliases, demonyms)
    references: dict[str, list[str]] = field(default_factory=dict)

    def fact(self, fact_id: str) -> Fact:
        return self._by_id()[fact_id]

    def _by_id(self) -> dict[str, Fact]:
        if getattr(self, "_index", None) is None:
            self._index = {f.id: f for f in self.facts}
        return self._index

    def stats(self) -> dict:
        per_rel: dict[str, dict] = {}
        for f in self.facts:
            r = per_rel.setdefault(f.relation, {"facts": 0, "finetune": 0, "heldout": 0, "objects": set()})
            r["facts"] += 1
            r[f.split] += 1
            r["objects"].add(f.object)
        for r in per_rel.values():
            r["distinct_objects"] = len(r.pop("objects"))
        out = {
            "facts": len(self.facts),
            "documents": len(self.documents),
            "characters": sum(len(d["text"]) for d in self.documents),
            "per_relation": per_rel,
        }
        if self.config.style != "standard":
            from msif.worldfacts.hard_stats import hard_stats

            out["hard"] = hard_stats(self)
        return out
