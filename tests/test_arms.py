"""Fine-tuning arms: the same items and steps for every arm, what each arm's contexts carry, KAFT's conditions,
the refusal of a missing adapter, and the default `clear` arm's examples unchanged by the arms."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import polars as pl
import pytest

from schemas.tables import CONDITIONS, ITEMS, SENTENCE_SCORES, SENTENCES
from tasks.core import chat, prompts
from tasks.core.marking import ContextUnits, context_units, unit_flags
from tasks.core.storage import read_table, text_key, write_parquet
from tasks.evaluate.methods import REGISTRY as METHODS
from tasks.finetune.arms import ARMS, REGISTRY, resolve_arms
from tasks.finetune.data import arm_items
from tasks.finetune.examples import select_train_items
from tasks.finetune.stage import arm_examples, require_adapters, run_finetune

N_FACTS = 6
FILLER = ["Water boils at 100 degrees.", "The Nile flows north.", "Cats are mammals.", "Snow is cold."]
MARKED = re.compile(r"<conflict> (.*?) </conflict>")


def _flagged(k: int) -> set[int]:
    """The units the probe flags in fact k's counterfactual context: one, two or none (k mod 3)."""
    return [{1}, {1, 3}, set()][k % 3]


def _contexts(k: int) -> dict[str, list[tuple[str, bool | None]]]:
    """Fact k's contexts per condition: (unit, conflicting) in order; unit 1 is about the question."""
    cf, true = f"Landmark {k} is in Rome.", f"Landmark {k} is in Paris."
    distractor = f"Landmark {k + 10} is in Oslo."  # false but not about the question: not conflicting
    return {
        "counterfactual": [(FILLER[k % 4], False), (cf, True), (FILLER[(k + 1) % 4], False), (distractor, False)],
        "aligned": [(FILLER[k % 4], False), (true, False), (FILLER[(k + 1) % 4], False), (distractor, False)],
        "irrelevant": [(FILLER[k % 4], False), (FILLER[(k + 2) % 4], False), (FILLER[(k + 1) % 4], False),
                       (distractor, False)],
    }


def _item(k: int, condition: str, split: str, units: list[str]) -> dict:
    return {
        "item_id": f"kf-{k}-{condition}", "dataset": "synthetic", "split": split, "group": f"landmark {k}",
        "relation_id": "P131", "question": f"Where is landmark {k}?", "context": " ".join(units),
        "answers": ["Rome" if condition == "counterfactual" else "Paris"], "orig_answers": ["Paris"],
        "counterfactual": condition == "counterfactual", "source_id": str(k), "condition": condition,
    }


def write_arm_run(paths, all_conditions: bool = True, labelled: bool = True) -> None:
    """N_FACTS train facts (with their aligned and irrelevant items when `all_conditions`) and one test item."""
    items, sents, scores = [], [], []
    for k in range(N_FACTS + 1):
        split = "train" if k < N_FACTS else "test"
        conditions = CONDITIONS if all_conditions else CONDITIONS[:1]
        for condition in conditions:
            units = _contexts(k)[condition]
            items.append(_item(k, condition, split, [u for u, _ in units]))
            pos = 0
            for j, (text, conflicting) in enumerate(units):
                item_id = items[-1]["item_id"]
                sents.append({"item_id": item_id, "sent_idx": j, "key": text_key(text), "text": text,
                              "char_start": pos, "char_end": pos + len(text),
                              "conflicting": conflicting if labelled else None})
                flagged = condition == "counterfactual" and j in _flagged(k)
                scores.append({"item_id": item_id, "sent_idx": j, "key": text_key(text), "layer": 2,
                               "probe": "logistic", "p_conflict": 0.9 if flagged else 0.1, "flagged": flagged})
                pos += len(text) + 1
    write_parquet(items, paths.table("items"), ITEMS)
    write_parquet(sents, paths.table("sentences"), SENTENCES)
    write_parquet(scores, paths.table("sentence_scores"), SENTENCE_SCORES)


@pytest.fixture()
def arm_run(run_paths):
    write_arm_run(run_paths)
    return run_paths


@pytest.fixture(scope="module")
def tok(tiny_model):
    from tasks.core.config import ModelConfig
    from tasks.core.models import load_tokenizer

    return load_tokenizer(ModelConfig(name=tiny_model))


def _train_items(paths, arm: str, max_items: int = 4, seed: int = 0):
    items = read_table(paths.table("items"))
    selected = select_train_items(items, max_items, seed)
    return arm_items(REGISTRY[arm], selected, items, context_units(paths), seed)


def test_registry_and_the_methods_it_generates():
    assert [a.name for a in ARMS] == ["clear", "sft", "kaft", "clear_markers_only", "clear_random_markers",
                                      "clear_oracle_markers"]
    assert [(a.markers, a.attention, a.data) for a in ARMS] == [
        ("probe", True, "counterfactual"), ("none", False, "counterfactual"), ("none", False, "kaft"),
        ("probe", False, "counterfactual"), ("random", True, "counterfactual"), ("oracle", True, "counterfactual")]
    with pytest.raises(ValueError, match=r"unknown fine-tuning arm\(s\) \['dpo'\]; known: \['clear', "):
        resolve_arms(["clear", "dpo"])
    for arm in ARMS:  # every arm's adapter answers; a marked arm on the marked and on the plain context
        generated = {m.name: m for m in METHODS.values() if m.model == "finetuned" and m.arm == arm.name}
        expected = {arm.name: "marked", f"{arm.name}_unmarked": "plain"} if arm.marked else {arm.name: "plain"}
        assert {n: m.context for n, m in generated.items()} == expected
        assert all(m.messages is arm.messages for m in generated.values())
    assert [n for n, m in METHODS.items() if m.model == "finetuned" and m.default] == ["clear", "clear_unmarked"]
    assert METHODS["clear"].messages is prompts.marked_qa_messages is METHODS["clear_unmarked"].messages
    assert METHODS["sft"].messages is prompts.qa_messages


def test_arms_see_the_same_items(arm_run):
    by_arm = {a.name: _train_items(arm_run, a.name) for a in ARMS}
    selected = [t.item_id for t in by_arm["clear"]]
    assert len(selected) == 4 and all(i.endswith("-counterfactual") for i in selected)
    for name, train_items in by_arm.items():
        facts = [t.item_id.split("-")[1] for t in train_items]
        assert sorted(facts) == sorted(i.split("-")[1] for i in selected), name  # KAFT: the same facts
        if name != "kaft":
            assert [t.item_id for t in train_items] == selected, name


def test_sft_prompts_carry_no_marker(arm_run, tok):
    examples = arm_examples(REGISTRY["sft"], _train_items(arm_run, "sft"), tok, 256)
    for ex in examples:
        text = tok.decode(ex.input_ids)
        assert "conflict" not in text and not any(ex.marked)
        assert "Landmark" in text  # the context is there, unmarked
    assert REGISTRY["sft"].attention is False


def test_random_markers_keep_the_probe_count_not_its_places(arm_run):
    probe = {t.item_id: MARKED.findall(t.context) for t in _train_items(arm_run, "clear")}
    rand = {t.item_id: MARKED.findall(t.context) for t in _train_items(arm_run, "clear_random_markers")}
    assert rand.keys() == probe.keys()
    counts = {i: len(_flagged(int(i.split("-")[1]))) for i in probe}  # the fixture's flags, by hand
    assert {i: len(m) for i, m in probe.items()} == counts == {i: len(m) for i, m in rand.items()}
    assert any(sorted(rand[i]) != sorted(probe[i]) for i in probe)  # placement differs somewhere
    assert rand == {t.item_id: MARKED.findall(t.context) for t in _train_items(arm_run, "clear_random_markers")}


def test_oracle_markers_are_the_conflicting_labels(arm_run, run_paths):
    for t in _train_items(arm_run, "clear_oracle_markers"):
        k = int(t.item_id.split("-")[1])
        assert MARKED.findall(t.context) == [f"Landmark {k} is in Rome."]  # the one conflicting unit
    write_arm_run(run_paths, labelled=False)
    with pytest.raises(ValueError, match=r"arm 'clear_oracle_markers' marks the gold `conflicting` units, and 4 of"
                       r" 4 selected train contexts have units without that label"):
        _train_items(run_paths, "clear_oracle_markers")


def test_each_marker_source_marks_its_units_and_refuses_what_it_cannot_mark():
    units = ContextUnits(["a", "b", "c"], flagged=[True, False, False], conflicting=[False, True, False])
    assert unit_flags(units, "probe", "k") == [True, False, False]
    assert unit_flags(units, "oracle", "k") == [False, True, False]
    unlabelled = ContextUnits(["a", "b"], flagged=[True, False], conflicting=[True, None])
    with pytest.raises(ValueError, match=r"^oracle markers need a `conflicting` label on every unit; 0:item-3 has "
                                         r"unlabelled units$"):
        unit_flags(unlabelled, "oracle", "0:item-3")
    with pytest.raises(ValueError, match=r"^unknown marker source 'gold'; known: \['oracle', 'probe', 'random'\]$"):
        unit_flags(units, "gold", "k")


def test_kaft_covers_the_three_conditions(arm_run, run_paths):
    train_items = _train_items(arm_run, "kaft")
    assert Counter(t.condition for t in train_items) == {"counterfactual": 2, "aligned": 1, "irrelevant": 1}
    for t in train_items:
        assert "conflict" not in t.context
        assert t.answers == (["Rome"] if t.condition == "counterfactual" else ["Paris"])
    write_arm_run(run_paths, all_conditions=False)
    with pytest.raises(ValueError, match=r"arm 'kaft' .* dataset 'synthetic' has none: with known-facts add"
                       r" --ingest.all-train-conditions"):
        _train_items(run_paths, "kaft")


def test_known_facts_option_adds_train_conditions_and_changes_nothing_else():
    from tasks.core.config import RunConfig
    from tasks.ingest.stage import ingest

    plain = ingest(RunConfig(run="t", limit=120)).items
    kaft = ingest(RunConfig(run="t", limit=120, ingest={"all_train_conditions": True})).items
    by_id = {i["item_id"]: i for i in kaft}
    assert all(by_id[i["item_id"]] == i for i in plain)  # every item of the default build, unchanged
    added = [i for i in kaft if i["item_id"] not in {p["item_id"] for p in plain}]
    train_facts = {i["source_id"] for i in plain if i["split"] == "train"}
    assert {(i["split"], i["condition"]) for i in added} == {("train", "aligned"), ("train", "irrelevant")}
    assert Counter(i["source_id"] for i in added) == {f: 2 for f in train_facts}
    with pytest.raises(ValueError, match="ingest.all_train_conditions needs ingest.known_facts_version 2"):
        ingest(RunConfig(run="t", limit=30, ingest={"all_train_conditions": True, "known_facts_version": "1"}))


def test_missing_adapter_is_one_line_with_the_command(tiny_cfg, arm_run):
    import tasks.evaluate.stage as ev

    with pytest.raises(FileNotFoundError, match=r"run 't' has no adapter of fine-tuning arm\(s\) \['sft'\] .*"
                       r"`clearflow run --run t --finetune.arms sft`"):
        ev._load_adapter(tiny_cfg, arm_run, "sft")
    (arm_run.arm_adapter("clear") / "adapter_config.json").parent.mkdir(parents=True)
    (arm_run.arm_adapter("clear") / "adapter_config.json").write_text("{}")
    cfg = tiny_cfg.model_copy(update={"evaluate": tiny_cfg.evaluate.model_copy(
        update={"methods": ["full_context", "clear", "kaft"]})})
    with pytest.raises(FileNotFoundError, match=r"\['kaft'\] .*--finetune.arms clear,kaft`") as err:
        ev.run_evaluate(cfg, arm_run)  # refused before any generation
    assert "\n" not in str(err.value)
    assert not arm_run.table("predictions").exists()
    require_adapters(arm_run, ["clear"])  # present: no error


def test_every_arm_trains_the_same_steps(tiny_cfg, arm_run):
    fcfg = tiny_cfg.finetune.model_copy(update={"arms": [a.name for a in ARMS], "epochs": 2, "lr": 5e-3})
    cfg = tiny_cfg.model_copy(update={"finetune": fcfg})
    retired = arm_run.arm_adapter("retired")
    retired.mkdir(parents=True)
    run_finetune(cfg, arm_run)
    logs = json.loads(arm_run.train_log.read_text())
    assert set(logs) == {a.name for a in ARMS}
    assert {(log["n_items"], log["steps"], log["lr"], log["seed"]) for log in logs.values()} == {(4, 8, 5e-3, 0)}
    lam = fcfg.attn_lambda
    assert {n: log["lambda"] for n, log in logs.items()} == {
        "clear": lam, "sft": 0.0, "kaft": 0.0, "clear_markers_only": 0.0, "clear_random_markers": lam,
        "clear_oracle_markers": lam}
    assert logs["kaft"]["conditions"] == {"aligned": 1, "counterfactual": 2, "irrelevant": 1}
    assert logs["sft"]["n_marked"] == 0 and logs["sft"]["attn_first"] is None
    assert logs["clear_oracle_markers"]["n_marked"] == 4
    for arm in ARMS:
        assert json.loads((arm_run.arm_adapter(arm.name) / "train_log.json").read_text()) == logs[arm.name]
        assert (arm_run.arm_adapter(arm.name) / "adapter_model.safetensors").exists()
    assert not retired.exists()  # an arm no longer configured leaves no adapter behind


# ------------------------------------------------------------------ the pre-arms route, frozen as the reference


def _old_marked_contexts(paths) -> dict[str, str]:
    sentences = read_table(paths.table("sentences")).select("item_id", "sent_idx", "text")
    scores = read_table(paths.table("sentence_scores")).select("item_id", "sent_idx", "flagged")
    joined = sentences.join(scores, on=["item_id", "sent_idx"], how="left").with_columns(
        pl.col("flagged").fill_null(False))
    return {item_id: prompts.mark_context(g["text"].to_list(), g["flagged"].to_list())
            for (item_id,), g in joined.sort("item_id", "sent_idx").group_by("item_id", maintain_order=True)}


def _old_example(tok, question, context, answers, max_length) -> tuple[list[int], list[int], list[bool]]:
    prompt_text = chat.render(tok, prompts.marked_qa_messages(question, context))
    enc = chat.encode(tok, prompt_text, return_offsets_mapping=True)
    start = prompt_text.rfind(context)
    spans = [(start + m.start(), start + m.end()) for m in
             re.finditer(re.escape(prompts.OPEN) + r".*?" + re.escape(prompts.CLOSE), context, re.DOTALL)]
    marked = [any(s < e1 and e > s1 for s1, e1 in spans) for s, e in enc["offset_mapping"]]
    prompt_ids = list(enc["input_ids"])
    target = list(tok(prompts.target_text(answers, tok), add_special_tokens=False)["input_ids"])[:max_length]
    cut = max(len(prompt_ids) - (max_length - len(target)), 0)
    prompt_ids, marked = prompt_ids[cut:], marked[cut:]
    return prompt_ids + target, [-100] * len(prompt_ids) + target, marked + [False] * len(target)


def _old_route(tok, paths, max_items: int, seed: int, max_length: int) -> list[tuple]:
    """The examples the single-adapter finetune stage built (its code as it was, here as the reference)."""
    train = read_table(paths.table("items")).filter(pl.col("split") == "train").sort("item_id")
    if train.height > max_items:
        train = train[sorted(random.Random(seed).sample(range(train.height), max_items))]
    contexts = _old_marked_contexts(paths)
    return [_old_example(tok, prompts.item_question(r), contexts.get(r["item_id"], r["context"]), r["answers"],
                         max_length) for r in train.iter_rows(named=True)]


@pytest.mark.parametrize("max_length", [512, 48])  # 48: left truncation too
def test_clear_examples_are_byte_identical_to_the_old_route(tok, run_paths, tmp_path, max_length):
    from tasks.core.storage import RunPaths

    old_run = RunPaths(tmp_path / "old")
    write_arm_run(old_run, all_conditions=False)  # the old route saw counterfactual train items only
    write_arm_run(run_paths, all_conditions=True)  # the new one also sees KAFT's items, and must ignore them
    new = arm_examples(REGISTRY["clear"], _train_items(run_paths, "clear", seed=3), tok, max_length)
    old = _old_route(tok, old_run, 4, 3, max_length)
    assert [(e.input_ids, e.labels, e.marked) for e in new] == old
    if max_length == 48:
        assert all(len(ids) == 48 for ids, _, _ in old)  # every prompt cut from the left
    else:
        assert sum(any(m) for _, _, m in old) >= 2  # marked spans are compared too

