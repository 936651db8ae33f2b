"""Lexical copy: no model; the context sentence sharing most content words with the question, minus the question's words.

A floor for every context-reading method: how far pure copying gets on a benchmark. When one sentence
names the question's subject and relation, copying it already answers.
Overlap counts distinct normalised content words (SQuAD normal form, function words and a trailing 's
dropped); ties go to the earliest sentence, so the answer is deterministic. The answer keeps the chosen
sentence's words whose normal form is not a question word, with function words trimmed at either end
("in Rome" -> "Rome", while "Bank of England" keeps its "of").
"""

from __future__ import annotations

import re

from tasks.core.splitter import split_sentences
from tasks.core.text import normalize
from tasks.evaluate.methods.base import Method

FUNCTION_WORDS = frozenset(
    "a an the of in on at to for by with from as and or but not no nor is are was were be been being am has have had"
    " do does did it its he she they him his her hers their them this that these those there here what which who"
    " whom whose when where why how into onto over under than then so such also very".split()
)
_POSSESSIVE = re.compile(r"['\u2019]s$", re.I)


def word_key(word: str) -> str:
    """A surface word's normal form: SQuAD normalisation after dropping a possessive 's ("Helsinki's" -> "helsinki")."""
    return normalize(_POSSESSIVE.sub("", word))


def content_words(text: str) -> set[str]:
    """Distinct normalised words of `text` that are not function words."""
    keys = (word_key(w) for w in text.split())
    return {k for k in keys if k and k not in FUNCTION_WORDS}


def best_sentence(question: str, context: str) -> str:
    """The context sentence with most content words in common with the question (the first one on ties)."""
    sentences = [s for s, _, _ in split_sentences(context)]
    if not sentences:
        return ""
    wanted = content_words(question)
    overlaps = [len(content_words(s) & wanted) for s in sentences]
    return sentences[overlaps.index(max(overlaps))]


def _strip_punctuation(word: str) -> str:
    """A surface word without the punctuation around it ("Rome." -> "Rome")."""
    return re.sub(r"^\W+|\W+$", "", word)


def lexical_copy(question: str, context: str | None) -> str:
    """The best sentence's words not in the question, function words trimmed at the ends; '' without a context."""
    if not context:
        return ""
    asked = {word_key(w) for w in question.split()}
    kept = [w for w in best_sentence(question, context).split() if word_key(w) and word_key(w) not in asked]
    while kept and word_key(kept[0]) in FUNCTION_WORDS:
        kept.pop(0)
    while kept and word_key(kept[-1]) in FUNCTION_WORDS:
        kept.pop()
    return " ".join(_strip_punctuation(w) for w in kept)


METHOD = Method(
    "lexical_copy", "lexical copy",
    "no model: the words of the context sentence overlapping the question most, minus the question's words",
    None, context="plain", model="none", answer=lexical_copy,
)
