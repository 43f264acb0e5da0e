"""How hard a hard world's sources are (recorded in its ``world.json``), and the hard world's version."""

from __future__ import annotations

from typing import TYPE_CHECKING

from msif.worldfacts.words import has_word, uses_question_words

if TYPE_CHECKING:
    from msif.worldfacts.corpus_types import WorldCorpus

#: Bump when the hard world's generation changes (part of a hard world's cache hash).
HARD_VERSION = "1"


def hard_stats(corpus: WorldCorpus) -> dict:
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
