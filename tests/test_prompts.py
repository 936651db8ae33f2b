"""The shared prompt text, fixed word for word.

The recorded real-model numbers (tests/test_default_model.py, the README) were measured with exactly these
prompts, so a change to a system line or the marker format must be made on purpose, here and there.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tasks.core.prompts import (
    chat_messages,
    mark_context,
    marked_qa_messages,
    qa_messages,
    target_text,
)

PLAIN = "Answer the question with the exact answer only: a few words, no sentence, no explanation."
MARKED = (PLAIN + " Facts between <conflict> and </conflict> may contradict what you remember;"
          " the context is right, so answer according to it.")


def test_the_plain_qa_prompt_word_for_word():
    assert qa_messages("Where is the tower?", "The tower is in Rome.") == [
        {"role": "system", "content": PLAIN},
        {"role": "user", "content": "Context: The tower is in Rome.\nQuestion: Where is the tower?"},
    ]


def test_the_marked_qa_prompt_word_for_word():
    context = mark_context(["Paris is in France.", "The tower is in Rome.", "Cats purr."], [False, True, False])
    assert context == "Paris is in France. <conflict> The tower is in Rome. </conflict> Cats purr."
    assert marked_qa_messages("Where is the tower?", context) == [
        {"role": "system", "content": MARKED},
        {"role": "user", "content": f"Context: {context}\nQuestion: Where is the tower?"},
    ]


def test_every_prompt_is_one_system_line_and_one_user_turn():
    assert chat_messages("s", "u") == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def test_marking_needs_one_flag_per_sentence():
    assert mark_context([], []) == ""
    assert mark_context(["A.", "B."], [True, True]) == "<conflict> A. </conflict> <conflict> B. </conflict>"
    with pytest.raises(ValueError, match=r"^2 sentences but 1 flags$"):
        mark_context(["A.", "B."], [True])


def test_the_target_is_the_first_gold_answer_then_end_of_sequence():
    assert target_text(["Rome", "Roma"], SimpleNamespace(eos_token="</s>")) == "Rome</s>"
    assert target_text(["Rome", "Roma"], SimpleNamespace(eos_token=None)) == "Rome"
