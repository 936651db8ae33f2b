"""The evaluation methods' declarations and prompts, against expectations written out by hand.

The registries are built when their modules are imported; these tests call the functions that build them, so a
change to what a method or arm declares shows here and not only in a pipeline run.
"""

from __future__ import annotations

import pytest

from tasks.core.prompts import full_question, item_question, marked_qa_messages, qa_messages
from tasks.core.config import RunConfig
from tasks.evaluate.methods import REGISTRY as METHODS
from tasks.evaluate.methods import Method, evaluated_methods, kre, method_label
from tasks.evaluate.methods.arms import METHOD as ARM_METHODS
from tasks.evaluate.methods.arms import arm_methods
from tasks.evaluate.methods.opin import opinion_prompt
from tasks.finetune.arms import ARMS, REGISTRY, Arm


def _declared(method) -> tuple:
    return (method.name, method.label, method.context, method.model, method.arm, method.default, method.comparison,
            method.weights, method.decoding)


def test_a_marked_arm_answers_on_the_marked_and_on_the_plain_context():
    marked, unmarked = arm_methods(REGISTRY["clear"])
    assert _declared(marked) == ("clear", "CLEAR", "marked", "finetuned", "clear", True, True, "adapter:clear",
                                 "greedy")
    assert _declared(unmarked) == ("clear_unmarked", "CLEAR weights, no markers", "plain", "finetuned", "clear",
                                   True, True, "adapter:clear", "greedy")
    assert marked.description == ("the marked context, adapter trained on probe-marked contexts, CE + attention loss"
                                  " (CLEAR)")
    assert unmarked.description == ("ablation: the clear adapter on the unmarked context (what the markers add at"
                                    " inference)")
    assert marked.messages is unmarked.messages is marked_qa_messages
    assert marked.needs == ("probes", "finetune") and unmarked.needs == ("finetune",)


def test_other_marked_arms_are_not_default_and_their_unmarked_rows_stay_out_of_the_comparison():
    marked, unmarked = arm_methods(REGISTRY["clear_random_markers"])
    assert _declared(marked)[:1] + _declared(marked)[5:7] == ("clear_random_markers", False, True)
    assert _declared(unmarked)[:1] + _declared(unmarked)[5:7] == ("clear_random_markers_unmarked", False, False)
    assert unmarked.label == "CLEAR random markers weights, no markers"


def test_an_unmarked_arm_answers_once_on_the_plain_context_under_its_training_prompt():
    (sft,) = arm_methods(REGISTRY["sft"])
    assert _declared(sft) == ("sft", "SFT", "plain", "finetuned", "sft", False, True, "adapter:sft", "greedy")
    assert sft.description == ("the context, adapter trained on the same items' plain contexts, CE only (supervised"
                               " fine-tuning)")
    assert sft.messages is qa_messages


def test_the_registry_holds_what_the_arms_generate():
    assert ARM_METHODS == [m for arm in ARMS for m in arm_methods(arm)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("markers", "gold", r"arm 'x': markers must be one of \('probe', 'none', 'random', 'oracle'\), data one of "
                            r"\('counterfactual', 'kaft'\)$"),
        ("data", "web", "arm 'x': markers must be one of"),
        ("attention", True, r"arm 'x': the attention loss needs marked units \(markers='none'\)"),
    ],
)
def test_an_arm_that_cannot_train_is_refused_with_the_reason(field, value, message):
    fields = {"markers": "none", "attention": False, "data": "counterfactual", field: value}
    with pytest.raises(ValueError, match=f"^{message}"):
        Arm("x", "X", "x", **fields)


def test_every_valid_declaration_is_accepted():
    for markers in ("probe", "random", "oracle"):
        for data in ("counterfactual", "kaft"):
            for attention in (True, False):
                assert Arm("x", "X", "x", markers=markers, attention=attention, data=data).marked
    assert not Arm("x", "X", "x", markers="none", attention=False, data="kaft").marked


@pytest.mark.parametrize(
    ("question", "asked"),
    [
        ("Where is the tower? ", "Q: Where is the tower in Bob's opinion?"),  # trailing blank, then the "?" cut
        ("Name the capital", "Q: Name the capital in Bob's opinion?"),  # no "?": nothing cut
        ("Who? \nOptions: a; b\nAnswer with one word.",  # options and instruction lines follow, one per line
         "Q: Who in Bob's opinion?\nOptions: a; b\nAnswer with one word."),
    ],
)
def test_opinion_prompt_cuts_only_a_final_question_mark(question, asked):
    assert opinion_prompt(question, 'Say "no".') == f'Bob said "Say no."\n{asked}\nA:'


def test_prompts_that_need_a_context_refuse_none_by_name():
    with pytest.raises(ValueError, match=r"^the opinion prompt needs a context$"):
        opinion_prompt("q", None)
    with pytest.raises(ValueError, match=r"^the KRE prompt needs a context$"):
        kre.messages("q", None)
    with pytest.raises(ValueError, match=r"^the QA prompt needs a context$"):
        qa_messages("q", None)


def test_a_method_answers_through_a_model_or_a_function_never_both():
    ask, answer = (lambda q, c: []), (lambda q, c: "")
    assert Method("m", "M", "d", ask, context="plain", model="base").weights == "base"
    assert Method("m", "M", "d", ask, context="marked", model="finetuned", arm="sft").weights == "adapter:sft"
    assert Method("m", "M", "d", None, context="plain", model="none", answer=answer).weights == "none"
    message = r"^method 'm': give `messages` with model 'base'/'finetuned', or `answer` with model 'none'$"
    for messages, model, given in ((None, "base", None), (ask, "base", answer), (ask, "none", answer),
                                   (None, "none", None), (None, "finetuned", answer)):
        with pytest.raises(ValueError, match=message):
            Method("m", "M", "d", messages, context="plain", model=model, answer=given)


def test_labels_and_the_default_list_come_from_the_registry():
    assert method_label("full_context") == METHODS["full_context"].label
    assert method_label("retired_method") == "retired_method"  # a name from an older run stays as it is
    default = RunConfig.model_validate({"run": "t"})
    assert evaluated_methods(default) == [n for n, m in METHODS.items() if m.default]
    assert "clear" in evaluated_methods(default) and "opin" not in evaluated_methods(default)
    named = RunConfig.model_validate({"run": "t", "evaluate": {"methods": ["opin", "closed_book"]}})
    assert evaluated_methods(named) == ["opin", "closed_book"]


def test_the_full_question_appends_options_and_the_instruction_on_their_own_lines():
    assert full_question(" Which city? ", [" Rome", "Paris "], " Answer with one word. ") == (
        "Which city?\nOptions: Rome; Paris\nAnswer with one word.")
    assert full_question("Which city?") == "Which city?"
    item = {"question": "Which city?", "choices": ["Rome", "Paris"], "instruction": "Answer with one word."}
    assert item_question(item) == "Which city?\nOptions: Rome; Paris\nAnswer with one word."
    assert item_question({"question": "Which city?", "choices": None}) == "Which city?"
