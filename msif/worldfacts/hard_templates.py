"""The hard world's sentence templates per relation: lexical and reworded statements, negations and
near-misses; alias introductions and the contrast prefix (see :mod:`msif.worldfacts.hard`)."""

from __future__ import annotations

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

#: Prefix that turns a lexical naming statement into a contrast with another subject {t}.
CONTRAST = "Unlike {t}, "
CONTRAST_PROB = 0.5
