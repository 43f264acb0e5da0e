"""The hard world's sentences: statements (naming and indirect), negations, near-misses, mentions.

The schedule of a fact's statements, contrasts and the choice of a negation's wrong object follow the
module docstring of :mod:`msif.worldfacts.hard`.
"""

from __future__ import annotations

import random

from msif.worldfacts.documents import Sentence, entity_index, mention_sentences
from msif.worldfacts.entities import CONTINENTS
from msif.worldfacts.facts import Fact
from msif.worldfacts.hard_templates import ALIAS_INTROS, CONTRAST, CONTRAST_PROB, HARD_TEMPLATES
from msif.worldfacts.references import Lexicon, extract_aliases, extract_references, usable_references
from msif.worldfacts.words import has_word, related


def _render(template: str, s: str, o: str = "", prefix: str = "") -> str:
    text = template.format(s=s, o=o)
    if prefix:
        text = prefix + (text if template.startswith("{") else text[0].lower() + text[1:])
    return text[0].upper() + text[1:]


def _schedule(n: int, has_references: bool) -> list[tuple[bool, str]]:
    """``(indirect, template kind)`` of a fact's ``n`` statements (see :mod:`msif.worldfacts.hard`)."""
    def alternate(first: str, i: int) -> str:
        return first if i % 2 == 0 else ("reworded" if first == "lexical" else "lexical")

    n_name = max(1, n // 2) if has_references else n
    return ([(False, alternate("lexical", i)) for i in range(n_name)]
            + [(True, alternate("reworded", i)) for i in range(n - n_name)])


class HardContext:
    """What sentence generation needs to know about the world: entities, references, neighbours, values."""

    def __init__(self, countries: list[dict], cities: list[dict], facts: list[Fact]):
        self.entities = entity_index(countries, cities)
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
        self.names = Lexicon(self.entities)

    def mentions(self, fact: Fact) -> tuple[str, ...]:
        return (fact.subject,) + ((fact.object,) if fact.object in self.entities else ())

    def contrast_partner(self, fact: Fact, text: str, rng: random.Random) -> str | None:
        """A subject for "Unlike {t}, ...": a neighbour when possible, whose fact of the relation has
        another object and none of whose facts' objects occur in ``text``."""
        def ok(g: Fact) -> bool:
            return (g.object != fact.object and not related(g.subject, fact.subject)
                    and not related(g.subject, fact.object)
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
            pool = sorted({v for v in pool if v not in true and not any(related(v, t) for t in true)
                           and not related(v, fact.subject) and not self.names.overlaps(v, exclude=v)})
            if pool:
                return rng.choice(pool)
        raise ValueError(f"no wrong object for {fact.id}")


def fact_statements(fact: Fact, ctx: HardContext, n: int, rng: random.Random) -> list[Sentence]:
    """The ``n`` sentences stating ``fact`` (naming and indirect ones, see :func:`_schedule`)."""
    spec = HARD_TEMPLATES[fact.relation]
    pools = {k: rng.sample(spec[k], len(spec[k])) for k in ("lexical", "reworded")}
    refs = usable_references(fact, ctx.references)
    refs = rng.sample(refs, len(refs))
    out: list[Sentence] = []
    contrasted = False
    for indirect, kind in _schedule(n, bool(refs)):
        template = (pools[kind] or pools["reworded" if kind == "lexical" else "lexical"]).pop()
        if indirect:  # the references in turn
            ref = refs[sum(t.indirect for t in out) % len(refs)]
            out.append(Sentence(_render(template, ref, fact.object), fact.subject, fact.id, ctx.mentions(fact), True))
            continue
        text = _render(template, fact.subject, fact.object)
        partner = None
        if kind == "lexical" and not contrasted and rng.random() < CONTRAST_PROB:
            partner = ctx.contrast_partner(fact, text, rng)
        if partner is not None:
            contrasted = True
            text = _render(template, fact.subject, fact.object, CONTRAST.format(t=partner))
        mentions = ctx.mentions(fact) + ((partner,) if partner else ())
        out.append(Sentence(text, fact.subject, fact.id, mentions))
    return out


def negative_sentences(fact: Fact, ctx: HardContext, rng: random.Random) -> list[Sentence]:
    """The fact's negation (a wrong object) and near-miss (no object); neither states a fact."""
    spec = HARD_TEMPLATES[fact.relation]
    wrong = ctx.distractor(fact, rng)
    neg_mentions = (fact.subject,) + ((wrong,) if wrong in ctx.entities else ())
    return [Sentence(_render(rng.choice(spec["negation"]), fact.subject, wrong), fact.subject, None, neg_mentions),
            Sentence(_render(rng.choice(spec["near_miss"]), fact.subject), fact.subject, None, (fact.subject,))]


def entity_sentences(name: str, ctx: HardContext, rng: random.Random, k: int, intros: bool) -> list[Sentence]:
    """A mention document's sentences: alias introductions (if ``intros``) and ``k`` mentions."""
    kind, ent = ctx.entities[name]
    out = []
    if intros:
        for a in ctx.aliases.get(name, []):
            out.append(Sentence(rng.choice(ALIAS_INTROS).format(s=name, a=a), name, None, (name,)))
    return out + mention_sentences(ent, kind, rng, k)
