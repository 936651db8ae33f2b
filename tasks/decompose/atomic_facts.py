"""Atomic-fact rewriting of contexts and question steps by a chat LLM (docs/METHOD.md stage 1)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from tasks.core.progress import tqdm

Messages = list[dict[str, str]]
MAX_STEPS = 8  # a rambling reply is not a plan; the relevance filter keeps top-k per step
Unit = tuple[int, str, str]  # (source sentence index, text, "fact" | "sentence")

FACTS_SYSTEM = "You rewrite text into atomic facts. You never add information that the text does not state."
FACTS_INSTRUCTIONS = """Rewrite each numbered sentence below as independent atomic facts.
Rules:
- An atomic fact states exactly one piece of information and can be understood on its own.
- Name the subject explicitly in every fact, with a specific name: never a pronoun such as he, she, it, they or this.
- Keep only what the sentence states; add nothing, drop nothing.
- Write one fact per line, starting with the number of the sentence it comes from in square brackets.
- A sentence that already states a single fact is written once, with its subject named.
- Write nothing else."""
# One worked example, given as an earlier turn of the conversation so the model answers the new text, not it.
FACTS_EXAMPLE = (
    ["Marie Curie was born in Warsaw.", "She won two Nobel Prizes, in physics and in chemistry."],
    "[1] Marie Curie was born in Warsaw.\n[2] Marie Curie won a Nobel Prize in physics.\n"
    "[2] Marie Curie won a Nobel Prize in chemistry.",
)
# A fact must mostly reuse the context's words: a small model that copies the example or invents is caught here.
MIN_GROUNDING = 0.5
_STOPWORDS = frozenset(
    "a an the of in on at to for by with from as and or but not no is are was were be been being has have had"
    " do does did it its he she they his her their them this that these those who which what there".split()
)

STEPS_SYSTEM = "You break questions into the short look-up steps needed to answer them."
STEPS_INSTRUCTIONS = """Split the question below into short retrieval steps: each step is one short question or
phrase saying what to look up. A simple question is a single step. Write one step per line and nothing else.

Example:
Question: What is the capital of the country where the Eiffel Tower stands?
Steps:
Which country is the Eiffel Tower in?
What is the capital of that country?
"""

# "[2] fact", "- [2] fact", "1. [2] fact": a bracketed sentence number wins over any list numbering before it.
_BRACKET = re.compile(r"^\s*(?:[-*•]|\d+[.)])?\s*\**\[(\d+)\]\**[\s:.)-]*(.*)$")
# "2. fact", "2) fact", "2: fact", "(2) fact", "- (2) fact", "Sentence 2: fact".
_PLAIN = re.compile(r"^\s*(?:[-*•]\s*)?\**(?:sentence\s*)?(?:\((\d+)\)|(\d+)[.):])\**\s+(.*)$", re.IGNORECASE)
_LIST_PREFIX = re.compile(r"^\s*(?:[-*•]|\d+[.):]|\(\d+\)|step\s*\d+\s*[:.)-])\s*", re.IGNORECASE)


class Chat(Protocol):
    """Anything that answers conversations in batches (tasks.decompose.llm.CachedChat)."""

    def complete_many(self, batch: list[Messages]) -> list[str]: ...


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _numbered_sentences(sentences: Sequence[str]) -> str:
    """The user turn of one context: the instructions, then its sentences numbered [1]..[n]."""
    numbered = "\n".join(f"[{i}] {_one_line(s)}" for i, s in enumerate(sentences, start=1))
    return f"{FACTS_INSTRUCTIONS}\n\nSentences:\n{numbered}\nFacts:"


def facts_messages(sentences: Sequence[str]) -> Messages:
    """The rewrite request for one context, after one worked example."""
    example, answer = FACTS_EXAMPLE
    return [
        {"role": "system", "content": FACTS_SYSTEM},
        {"role": "user", "content": _numbered_sentences(example)},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": _numbered_sentences(sentences)},
    ]


def steps_messages(question: str) -> Messages:
    """The request to split one question into retrieval steps."""
    user = f"{STEPS_INSTRUCTIONS}\nQuestion: {_one_line(question)}\nSteps:"
    return [{"role": "system", "content": STEPS_SYSTEM}, {"role": "user", "content": user}]


def _clean(text: str) -> str:
    """A fact's text without markdown emphasis, wrapping quotes or stray whitespace."""
    text = _one_line(text.replace("**", ""))
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def _numbered(line: str) -> tuple[int, str] | None:
    """(1-based sentence number, text) of a line that starts with one, else None."""
    m = _BRACKET.match(line)
    if m:
        return int(m.group(1)), m.group(2)
    m = _PLAIN.match(line)
    if m:
        return int(m.group(1) or m.group(2)), m.group(3)
    return None


def parse_facts(reply: str, n_sentences: int) -> list[tuple[int, str]]:
    """(0-based source index, fact) of every numbered line of a reply; prose, blanks and bad numbers are dropped."""
    facts: list[tuple[int, str]] = []
    seen: set[tuple[int, str]] = set()
    for line in reply.splitlines():
        found = _numbered(line)
        if found is None:
            continue
        number, text = found[0], _clean(found[1])
        if not 1 <= number <= n_sentences or not any(c.isalnum() for c in text):
            continue
        if (number - 1, text) not in seen:
            seen.add((number - 1, text))
            facts.append((number - 1, text))
    return facts


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in _STOPWORDS]


def grounded(fact: str, context_words: set[str]) -> bool:
    """Whether at least MIN_GROUNDING of a fact's content words occur in its context (so it is not invented)."""
    words = _content_words(fact)
    return bool(words) and sum(w in context_words for w in words) >= MIN_GROUNDING * len(words)


def decompose_context(sentences: Sequence[str], reply: str) -> list[Unit]:
    """Units of a context in source order: each sentence's grounded facts, or the sentence itself when it got none."""
    context_words = set(_content_words(" ".join(sentences)))
    by_source: dict[int, list[str]] = {}
    for idx, text in parse_facts(reply, len(sentences)):
        if grounded(text, context_words):
            by_source.setdefault(idx, []).append(text)
    units: list[Unit] = []
    for idx, sentence in enumerate(sentences):
        facts = by_source.get(idx)
        if facts:
            units.extend((idx, f, "fact") for f in facts)
        else:
            units.append((idx, sentence, "sentence"))
    return units


def atomic_units(
    chat: Chat, contexts: list[list[str]], progress: bool = True, batch_size: int = 16
) -> list[list[Unit]]:
    """Every context's units (facts with their source sentence, unrewritten sentences kept), in input order."""
    todo = [i for i, sents in enumerate(contexts) if sents]  # an empty context has nothing to rewrite
    replies: dict[int, str] = {}
    with tqdm(total=len(todo), desc="atomic facts", unit="ctx", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for i, reply in zip(chunk, chat.complete_many([facts_messages(contexts[i]) for i in chunk])):
                replies[i] = reply
            bar.update(len(chunk))
    return [decompose_context(sents, replies.get(i, "")) for i, sents in enumerate(contexts)]


def parse_steps(reply: str) -> list[str]:
    """Steps of a reply, one per line; list markers stripped, headers and duplicates dropped."""
    lines = [ln for ln in reply.splitlines() if ln.strip()]
    listed = [ln for ln in lines if _LIST_PREFIX.match(ln)]
    steps: list[str] = []
    for line in listed or lines:  # when the model made a list, prose around it is not a step
        text = _clean(_LIST_PREFIX.sub("", line, count=1))
        if text.endswith(":") or not any(c.isalnum() for c in text) or text in steps:
            continue
        steps.append(text)
    return steps[:MAX_STEPS]


def question_steps(chat: Chat, questions: list[str], batch_size: int = 16) -> list[list[str]]:
    """Each question's retrieval steps; the question itself when the reply gives no usable step."""
    out: list[list[str]] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        replies = chat.complete_many([steps_messages(q) for q in chunk])
        out.extend(parse_steps(r) or [q] for q, r in zip(chunk, replies))
    return out
