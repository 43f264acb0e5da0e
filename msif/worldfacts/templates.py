"""The standard world's sentence templates: statements per relation, mentions and filler.

Each relation has paraphrase templates that state the fact with the subject and the object verbatim
(``{s}``, ``{o}``), one question template (QA; phrased unlike the pre-training text) and the kind of
its subject. Mention templates name an entity without stating any relation fact (hard-negative
material); filler sentences name none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from msif.worldfacts.facts import Fact

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

#: Filler sentences: subject, verb phrase, time (none of them mentions an entity).
FILLER_SUBJECTS = ["The market", "A small bakery", "The library", "The harbour", "An old bridge",
                   "The train station", "A local school", "The museum", "The town hall", "A quiet garden",
                   "The football club", "The bus depot"]
FILLER_VERBS = ["opened early", "was busy", "closed for repairs", "was quiet", "was painted blue",
                "held a meeting", "welcomed visitors", "stayed open late"]
FILLER_TIMES = ["on Monday.", "in the spring.", "last year.", "after the rain.", "during the festival.",
                "at dawn.", "in the winter.", "before noon."]


def render(template: str, fact: Fact) -> str:
    """The sentence a template makes of a fact."""
    return template.format(s=fact.subject, o=fact.object)


def renderings(fact: Fact) -> list[str]:
    """Every sentence that states ``fact`` (one per template of its relation)."""
    return [render(t, fact) for t in RELATIONS[fact.relation]["templates"]]
