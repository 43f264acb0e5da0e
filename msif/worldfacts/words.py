"""Word tests of the hard world: whole-word matches, spelling variants, a relation's question words."""

from __future__ import annotations

import difflib
import functools
import re

from msif.worldfacts.templates import RELATIONS

#: Words of the question templates that carry no relation meaning.
QUESTION_STOPWORDS = frozenset("what is the of on which do you a from in".split())
#: Words left out when comparing names and phrases by their words.
_GLUE = frozenset("the of and a an de la le du da do del des di".split())


@functools.lru_cache(maxsize=None)
def _word_re(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z])" + re.escape(phrase) + r"(?![A-Za-z])", re.IGNORECASE)


def has_word(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (case-insensitive)."""
    return _word_re(phrase).search(text) is not None


def words_of(text: str) -> set[str]:
    """The lower-case words of ``text``, glue words ("the", "of", "de"...) left out."""
    return set(re.findall(r"[a-z]+", text.lower())) - _GLUE


def letters_of(text: str) -> str:
    """The lower-case letters of ``text``, nothing else."""
    return re.sub(r"[^a-z]", "", text.lower())


def related(a: str, b: str) -> bool:
    """Whether one of ``a``, ``b`` contains the other (case-insensitive)."""
    a, b = a.lower(), b.lower()
    return a in b or b in a


def similar(a: str, b: str) -> bool:
    """Whether the letters of one contain the other's, or are at least 70% similar."""
    a, b = letters_of(a), letters_of(b)
    return a in b or b in a or difflib.SequenceMatcher(None, a, b).ratio() >= 0.7


def is_variant(phrase: str, name: str) -> bool:
    """Whether ``phrase``, or one of its words, is a spelling variant of ``name`` or of one of its words
    ("Brasil" of "Brazil", "Russian" of "Russia", "Turkiye Cumhuriyeti" of "Turkey"): one contains the
    other or their letters are at least 70% similar (words of four letters or more)."""
    words, name_words = [w for w in words_of(phrase) if len(w) >= 4], [w for w in words_of(name) if len(w) >= 4]
    return similar(phrase, name) or any(similar(w, n) for w in words for n in name_words)


def question_words(relation: str) -> set[str]:
    """Content words of the relation's question ("capital" for "What is the capital of {s}?")."""
    return words_of(RELATIONS[relation]["question"].replace("{s}", "")) - QUESTION_STOPWORDS


def uses_question_words(text: str, relation: str) -> bool:
    """Whether ``text`` has a word starting like one of the question's words (first 5 letters)."""
    stems = [q[:5] for q in question_words(relation)]
    return any(w.startswith(s) for w in re.findall(r"[a-z]+", text.lower()) for s in stems)
