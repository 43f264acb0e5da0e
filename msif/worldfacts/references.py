"""References of the hard world: phrases that refer to a country without its name.

Official and native names from ``countryinfo`` (aliases) and phrases derived from the object of
another of the country's facts ("the country governed from Rome"); the rules that keep them from
naming another entity or giving a fact away are in the module docstring of :mod:`msif.worldfacts.hard`.
"""

from __future__ import annotations

from msif.worldfacts.entities import clean_name, countryinfo_by_iso2
from msif.worldfacts.facts import Fact
from msif.worldfacts.words import has_word, is_variant, letters_of, related, similar, uses_question_words, words_of

#: References built from the object of another of the country's facts (a second hop).
DERIVED_REFERENCES = {
    "demonym": "the {o} nation",
    "capital": "the country governed from {o}",
    "currency": "the country that pays in the {o}",
    "language": "the country where {o} is the main language",
}
#: At most this many aliases (official / native names) per country.
MAX_ALIASES = 2


class Lexicon:
    """Entity names and fact objects, indexed by word for quick "does this phrase name one" checks."""

    def __init__(self, phrases):
        self.by_word: dict[str, set[str]] = {}
        for p in phrases:
            for w in words_of(p):
                self.by_word.setdefault(w, set()).add(p)

    def overlaps(self, phrase: str, exclude: str = "") -> bool:
        """Whether ``phrase`` contains one of the phrases (as words) or is contained in one."""
        near = set().union(*(self.by_word.get(w, set()) for w in words_of(phrase))) - {exclude}
        return any(has_word(phrase, p) or has_word(p, phrase) for p in near)


def _country_names(info) -> list:
    """countryinfo's other names of a country: ``altSpellings``, then ``nativeName`` ("A / B" split)."""
    d = info.info() if info is not None else {}
    return list(d.get("altSpellings") or []) + (d.get("nativeName") or "").split("/")


def _alias_ok(a: str | None, name: str, own_objects: set[str], names: Lexicon, objects: Lexicon) -> bool:
    """Whether a cleaned package name may stand for the country ``name`` (see :mod:`msif.worldfacts.hard`)."""
    if not a or a.isupper() or len(letters_of(a)) < 4 or is_variant(a, name):
        return False  # missing, a code ("FRA"), or a spelling of the name ("Brasil")
    if words_of(a) & (words_of(name) | own_objects):
        return False  # shares a word with the name or with one of the country's answers
    return not names.overlaps(a, exclude=name) and not objects.overlaps(a)


def _aliases(name: str, raw: list, own_objects: set[str], names: Lexicon, objects: Lexicon) -> list[str]:
    """The clean aliases of one country among the package's raw names, in the package's order."""
    out: list[str] = []
    for r in raw:
        a = clean_name(r.strip()) if isinstance(r, str) else None
        if _alias_ok(a, name, own_objects, names, objects) and not any(similar(a, b) for b in out):
            out.append(a)
    return out


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _derived_phrases(name: str, values: dict[str, dict[str, str]], counts: dict[str, dict],
                     names: Lexicon) -> list[str]:
    """The phrases of :data:`DERIVED_REFERENCES` for one country (objects unique to it, not its name)."""
    out = []
    for rel, template in DERIVED_REFERENCES.items():
        o = values.get(rel, {}).get(name)
        if o and counts[rel][o] == 1 and not is_variant(o, name) and not names.overlaps(o, exclude=name):
            out.append(template.format(o=o))
    return out


def extract_aliases(countries: list[dict], cities: list[dict], facts: list[Fact]) -> dict[str, list[str]]:
    """Country name -> its official / native names that may be introduced (see :mod:`msif.worldfacts.hard`)."""
    capitals = [c["capital"] for c in countries if c["capital"]]
    names = Lexicon([c["name"] for c in countries] + [c["name"] for c in cities] + capitals)
    objects = Lexicon({f.object for f in facts})
    own: dict[str, set[str]] = {}
    for f in facts:
        own.setdefault(f.subject, set()).update(words_of(f.object))
    cinfo = countryinfo_by_iso2()
    aliases = {c["name"]: _aliases(c["name"], _country_names(cinfo.get(c["iso"])), own.get(c["name"], set()),
                                   names, objects) for c in countries}
    count = _counts(a.lower() for al in aliases.values() for a in al)
    return {n: [a for a in al if count[a.lower()] == 1][:MAX_ALIASES] for n, al in aliases.items()}


def extract_references(countries: list[dict], cities: list[dict], facts: list[Fact],
                       aliases: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Entity name -> phrases referring to it without its name: aliases, then derived phrases."""
    if aliases is None:
        aliases = extract_aliases(countries, cities, facts)
    names = Lexicon([c["name"] for c in countries] + [c["name"] for c in cities])
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
    return [r for r in references.get(fact.subject, []) if not (words_of(r) & words_of(fact.object))
            and not related(r, fact.object) and not uses_question_words(r, fact.relation)]
