"""Evaluate stage on the tiny model: method registry, batched greedy generation, predictions and metrics tables."""

from __future__ import annotations

import os
import re

import polars as pl
import pytest
import torch

from schemas.tables import ITEMS, METRICS, PREDICTIONS, SENTENCE_SCORES, SENTENCES
import tasks.evaluate.decoding_loop as dl
import tasks.evaluate.stage as ev
from tasks.core.chat import encode, render
from tasks.core.prompts import qa_messages
from tasks.core.storage import read_table, text_key, write_parquet
from tasks.evaluate.comparison import overall

EVALUATED = ["closed_book", "lexical_copy", "full_context", "instruction_only", "opin", "opinion_instruction", "kre",
             "cad", "probe_marking", "clear", "clear_unmarked"]  # every method but LFD (it needs dev items) and the arms
ARM_METHODS = ["sft", "kaft", "clear_markers_only", "clear_markers_only_unmarked", "clear_random_markers",
               "clear_random_markers_unmarked", "clear_oracle_markers", "clear_oracle_markers_unmarked"]
ALL = [*EVALUATED[:8], "lfd", *EVALUATED[8:], *ARM_METHODS]  # the registry, in report order
DEFAULT = ["closed_book", "lexical_copy", "full_context", "clear", "clear_unmarked"]  # `make run`'s short list
FLAGGED = "The Eiffel Tower is in Rome."


pytestmark = pytest.mark.usefixtures("one_thread")


def _item(i: int, split: str) -> dict:
    sentences = ["Berlin is in Germany.", FLAGGED if i % 2 == 0 else f"Item {i} is in Rome.", "Cats are mammals."]
    return {
        "item_id": f"it{i:02d}",
        "dataset": "synthetic",
        "split": split,
        "group": f"g{i}",
        "relation_id": "P17",
        "question": f"Where is landmark number {i}?",
        "context": " ".join(sentences),
        "answers": ["Rome", "Roma"],
        "orig_answers": ["Paris"],
        "orig_context": None,
        "target_sentence": sentences[1],
        "counterfactual": True,
        "_sentences": sentences,
    }


@pytest.fixture()
def run_with_items(run_paths):
    """A run dir with 5 test items, 2 train items, their sentences and probe flags (the middle sentence flagged)."""
    items = [_item(i, "test") for i in range(5)] + [_item(i, "train") for i in range(5, 7)]
    sentences, scores = [], []
    for it in items:
        pos = 0
        for j, s in enumerate(it["_sentences"]):
            sentences.append(
                {"item_id": it["item_id"], "sent_idx": j, "key": text_key(s), "text": s, "char_start": pos,
                 "char_end": pos + len(s), "relevance": None, "label": "conflict" if j == 1 else "irrelevant",
                 "truthful": j != 1}
            )
            scores.append(
                {"item_id": it["item_id"], "sent_idx": j, "key": text_key(s), "layer": 2, "probe": "logistic",
                 "p_conflict": 0.9 if j == 1 else 0.1, "flagged": j == 1}
            )
            pos += len(s) + 1
    write_parquet([{k: v for k, v in it.items() if k != "_sentences"} for it in items], run_paths.table("items"), ITEMS)
    write_parquet(sentences, run_paths.table("sentences"), SENTENCES)
    write_parquet(scores, run_paths.table("sentence_scores"), SENTENCE_SCORES)
    return run_paths


def _save_random_adapter(cfg, paths) -> None:
    """A real (non-zero) LoRA adapter in the clear arm's directory, as the finetune stage would leave it."""
    from peft import LoraConfig, get_peft_model

    from tasks.core.models import load_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_model(cfg.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(paths.arm_adapter("clear")))


def test_unknown_method_is_refused_with_known_list(tiny_cfg, run_paths):
    cfg = tiny_cfg.model_copy(update={"evaluate": tiny_cfg.evaluate.model_copy(update={"methods": ["full_context", "cat"]})})
    with pytest.raises(ValueError, match=r"unknown evaluation method.*'cat'.*known: \['cad', 'clear', 'clear_markers_only'"):
        ev.run_evaluate(cfg, run_paths)


def test_default_methods_are_the_registry_defaults_in_registry_order(tiny_cfg):
    from tasks.evaluate.methods import REGISTRY

    assert tiny_cfg.evaluate.methods is None
    assert list(REGISTRY) == ALL
    assert [m.name for m in ev.resolve_methods(None)] == [n for n in ALL if REGISTRY[n].default] == DEFAULT
    assert [m.name for m in ev.resolve_methods(["clear", "closed_book"])] == ["clear", "closed_book"]
    with pytest.raises(ValueError, match="listed twice"):
        ev.resolve_methods(["clear", "clear"])


def test_empty_split_is_refused(tiny_cfg, run_with_items):
    cfg = tiny_cfg.model_copy(update={"evaluate": tiny_cfg.evaluate.model_copy(update={"split": "dev"})})
    with pytest.raises(ValueError, match=r"no items in split 'dev'; splits present: \['test', 'train'\]"):
        ev.run_evaluate(cfg, run_with_items)


def test_first_line_and_eos_cut():
    assert dl.first_line("\n\n  Rome  \nBecause the context says so.") == "Rome"
    assert dl.first_line(" \n ") == ""
    assert dl.cut_at_eos([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert dl.cut_at_eos([5, 6], {2}) == [5, 6]


def test_first_line_stop_criterion(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [tok(t)["input_ids"] for t in ("\nRome\n", "\n", " Rome")]
    assert [dl.line_complete(tok, r) for r in rows] == [True, False, False]


def _hf_first_lines(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The independent route: transformers' own `generate`, one prompt at a time (no padding, no shared prefix, no
    early stop but EOS), each answer cut at EOS and to its first line."""
    eos, out = dl.eos_ids(model, tok), []
    for p in prompts:
        ids = torch.tensor([encode(tok, p)["input_ids"]])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
        out.append(dl.first_line(tok.decode(dl.cut_at_eos(gen[0, ids.shape[1]:].tolist(), eos),
                                            skip_special_tokens=True)))
    return out


@pytest.mark.usefixtures("one_thread")
def test_generate_equals_one_prompt_at_a_time_generate(tiny_model, monkeypatch):
    """Length-sorted batches, the shared prefix fed once, rows leaving the batch when done and prompts joining rows
    still answering change no answer: every answer equals transformers' `generate` on that prompt alone, in input
    order, whatever the batch size."""
    from tasks.core.config import ModelConfig
    from tasks.core.models import load_model, load_tokenizer

    cfg = ModelConfig(name=tiny_model)
    model, tok = load_model(cfg), load_tokenizer(cfg)
    words = ["alpha", "beta gamma delta epsilon zeta", "eta", "theta iota kappa", "lambda mu", "nu"]
    prompts = [render(tok, qa_messages(f"What comes after {w}?", f"The list reads {w}.")) + w for w in words]
    ids = dl.token_ids(tok, prompts)
    assert len(dl.Prefix.shared(model, ids).ids) > 5  # the system prompt and "Context: " are shared
    # the random model repeats a prompt's last token: one more EOS (ids[2] ends in "eta") ends some rows at once
    model.generation_config.eos_token_id = [tok.eos_token_id, ids[2][-1]]
    expected = _hf_first_lines(model, tok, prompts, 6)
    assert len(set(expected)) > 1  # the prompts get different answers: an order mix-up would show
    merges, merge = [], dl.Stream.merge
    monkeypatch.setattr(dl.Stream, "merge", lambda self, *others: merges.append(len(others)) or merge(self, *others))
    groups, grouping = [], dl.length_groups
    monkeypatch.setattr(dl, "length_groups", lambda lengths: groups.append(grouping(lengths)) or groups[-1])
    trace: dict = {}
    for batch_size in (1, 2, 4, 6):
        assert dl.generate(model, tok, prompts, 6, batch_size, trace=trace) == expected
    assert merges  # at batch 2 (or 4), a prompt joined a row still answering
    assert any(len(g) > 1 for g in groups)  # at batch 6, the long prompt was fed apart from the short ones
    assert len({len(steps) for steps in trace.values()}) > 1  # rows ended at different steps: some left early


@pytest.mark.usefixtures("one_thread")
def test_rows_leave_in_place_and_take_their_padding_with_them(tiny_model):
    """When rows leave, the last rows take their places inside the same KV slab (no new cache, only the moved rows
    copied), leading positions that only the leavers used are dropped (left padding: here the whole prompts, with
    no shared prefix; in a run, joined batches'), and every remaining row's next scores equal those of a fresh
    batch of just those prompts fed the same tokens (an independent route)."""
    from tasks.core.config import ModelConfig
    from tasks.core.models import load_model, load_tokenizer

    cfg = ModelConfig(name=tiny_model)
    model, tok = load_model(cfg), load_tokenizer(cfg)
    words = ["alpha beta gamma delta epsilon zeta eta theta", "iota", "kappa lambda", "mu", "nu xi omicron"]
    prompts = [render(tok, qa_messages(f"What comes after {w}?", "A list.")) + w for w in words]
    ids = dl.token_ids(tok, prompts)
    prefix, pad = dl.Prefix(model, []), dl.pad_id(model, tok)
    first, second = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12, 13, 14, 15])
    with torch.inference_mode():
        stream = dl.Stream(model, ids, prefix, pad)
        stream.advance(first)
        decoder = dl.Decoder([stream], dl.plain_scores)
        slab = stream.cache.layers[0]._slab[0]
        width = stream.mask.shape[1]
        order = decoder.drop([1, 2, 4], 5)  # the longest prompt (row 0) and row 3 leave
        assert order == [4, 1, 2]  # row 4 fills row 0's place; rows 1 and 2 stay where they were
        stream.advance(second[order])
        layer = stream.cache.layers[0]
        assert layer._slab[0].data_ptr() == slab.data_ptr()  # the same slab: nothing reallocated
        longest = max(len(ids[j]) for j in order)
        assert len(ids[0]) > longest  # row 0 was the longest: the others' padding goes with it
        assert stream.mask.shape[1] == layer.get_seq_length() == width - (len(ids[0]) - longest) + 1
        fresh = dl.Stream(model, [ids[j] for j in order], prefix, pad)
        fresh.advance(first[order])
        fresh.advance(second[order])
    torch.testing.assert_close(stream.logits, fresh.logits, rtol=0, atol=1e-5)


def test_length_groups_bound_the_padding_fed():
    """Hand-worked: in [10, 10, 10, 10, 11, 20, 20] the fifth row would pad 4 of 55 positions (7% > 5%) to a group of
    4 rows, so it starts a new one; that group, under 4 rows, takes the 20s whatever they pad."""
    assert dl.length_groups([10, 10, 10, 10, 11, 20, 20]) == [[0, 1, 2, 3], [4, 5, 6]]
    assert dl.length_groups([10, 10, 10, 10, 10, 10.5]) == [list(range(6))]  # 0.5 of 63 padded: under 5%
    assert dl.length_groups([10, 30, 50]) == [[0, 1, 2]]
    assert dl.length_groups([3, 5, 8], least=1) == [[0], [1], [2]]
    assert dl.length_groups([]) == []


def test_prompt_lookup_drafts_the_continuation_of_the_latest_matching_ngram():
    from tasks.evaluate.prompt_lookup import draft

    seq = [5, 6, 7, 8, 9, 5, 6, 1, 2, 3, 5, 6]  # last bigram (5, 6) occurs at 0 and 5: the later one wins
    assert draft(seq, 3) == [1, 2, 3] and draft(seq, 1) == [1]
    assert draft([1, 2, 3, 9, 2, 3], 4) == [9, 2, 3]  # the draft may run into the tail itself
    assert draft([1, 2, 3, 4, 9, 2, 3, 4], 2) == [9, 2]  # the trigram (2, 3, 4) is tried before the bigram
    assert draft([1, 2, 3, 4], 3) == [] and draft([7], 3) == [] and draft([], 3) == []
    assert draft([4, 4], 2, n_min=1) == [4]  # unigrams only when asked


@pytest.mark.usefixtures("one_thread")
def test_prompt_lookup_gives_the_greedy_answers_and_scores_in_fewer_steps(tiny_model, monkeypatch):
    """Drafts copied from the prompt are kept only where greedy decoding agrees: every answer, and the scores each
    token was chosen from, equal plain greedy decoding's, while the model runs fewer forward passes; a row that
    ends inside an accepted draft stops there."""
    from tasks.core.config import ModelConfig
    from tasks.core.models import load_model, load_tokenizer

    cfg = ModelConfig(name=tiny_model)
    model, tok = load_model(cfg), load_tokenizer(cfg)
    words = ["alpha beta alpha beta", "gamma", "delta epsilon delta epsilon delta", "zeta eta", "theta", "iota kappa"]
    prompts = [render(tok, qa_messages(f"Repeat {w}?", f"The list reads {w} {w}.")) + w for w in words]
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    plain_trace, drafted_trace = {}, {}
    for batch_size in (1, 3, 6):
        calls.clear()
        plain = dl.generate(model, tok, prompts, 12, batch_size, trace=plain_trace)
        plain_calls = len(calls)
        calls.clear()
        drafted = dl.generate(model, tok, prompts, 12, batch_size, trace=drafted_trace, draft_tokens=4)
        assert drafted == plain
        assert drafted_trace.keys() == plain_trace.keys()
        for i, steps in plain_trace.items():
            assert len(drafted_trace[i]) == len(steps)  # the same tokens, each chosen from the same scores
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(steps, drafted_trace[i]))
        assert len(calls) < plain_calls


def test_scores_follow_predictions(tiny_cfg, run_with_items, monkeypatch):
    """With scripted answers, EM/p_s/p_o/MR in both tables are exactly what the rules give."""
    scripted = {"closed_book": "Paris", "full_context": "Rome.", "opinion_instruction": "Not Rome", "probe_marking": "Roma or Paris"}

    def fake_generate(model, tok, prompts, max_new_tokens, batch_size, desc="", draft_tokens=0):
        return [scripted[desc]] * len(prompts)

    monkeypatch.setattr(ev, "generate", fake_generate)
    cfg = tiny_cfg.model_copy(update={"evaluate": tiny_cfg.evaluate.model_copy(update={"methods": list(scripted)})})
    ev.run_evaluate(cfg, run_with_items)
    table = read_table(run_with_items.table("metrics"))
    metrics = {r["method"]: r for r in overall(table).iter_rows(named=True)}
    assert list(metrics) == list(scripted)
    # closed book answers "Paris", the true answer of every item: all known, so each method's known rows equal
    # its overall ones and it has no unknown row
    assert read_table(run_with_items.table("predictions"))["known"].to_list() == [True] * 5 * len(scripted)
    known = {r["method"]: r for r in table.filter(pl.col("knowledge") == "known").iter_rows(named=True)}
    assert known == {m: r | {"knowledge": "known"} for m, r in metrics.items()}
    assert set(table["knowledge"]) == {"all", "known"} and set(table["condition"]) == {"all"}
    assert (metrics["closed_book"]["po"], metrics["closed_book"]["ps"]) == (1.0, 0.0)
    assert metrics["closed_book"]["mr"] == 1.0
    assert (metrics["full_context"]["em"], metrics["full_context"]["ps"], metrics["full_context"]["mr"]) == (1.0, 1.0, 0.0)
    assert (metrics["opinion_instruction"]["em"], metrics["opinion_instruction"]["ps"]) == (0.0, 0.0)  # negated
    assert metrics["opinion_instruction"]["f1"] == pytest.approx(2 / 3)
    assert (metrics["probe_marking"]["ps"], metrics["probe_marking"]["po"]) == (0.0, 1.0)  # both answers stated
    assert all(m["n"] == 5 for m in metrics.values())


def test_run_evaluate_all_methods_on_tiny_model(tiny_cfg, run_with_items, monkeypatch):
    import tasks.finetune.stage


    _save_random_adapter(tiny_cfg, run_with_items)
    calls = []
    real = tasks.finetune.stage.load_finetuned

    def spy(cfg, paths, arm):
        calls.append(arm)
        return real(cfg, paths, arm)

    monkeypatch.setattr(tasks.finetune.stage, "load_finetuned", spy)
    evaluate = tiny_cfg.evaluate.model_copy(update={"batch_size": 4, "methods": EVALUATED})
    cfg = tiny_cfg.model_copy(update={"evaluate": evaluate})
    ev.run_evaluate(cfg, run_with_items)

    assert calls == ["clear"]  # one adapter load serves clear and clear_unmarked
    preds = read_table(run_with_items.table("predictions"))
    assert preds.columns == PREDICTIONS.names
    assert preds.height == 5 * len(EVALUATED)
    assert preds["method"].unique(maintain_order=True).to_list() == EVALUATED
    assert set(preds["item_id"]) == {f"it{i:02d}" for i in range(5)}  # train items are not evaluated
    by = {m: preds.filter(pl.col("method") == m) for m in EVALUATED}

    def strip_markers(prompt: str) -> str:
        head, context = prompt.split("Context: ", 1)
        return head + "Context: " + re.sub(r"<conflict> (.*?) </conflict>", r"\1", context)

    assert not any("Context:" in p for p in by["closed_book"]["prompt"])
    assert all("Berlin is in Germany." in p for p in by["full_context"]["prompt"])
    assert all("Bob said" in p and "Instruction:" not in p for p in by["opin"]["prompt"])
    assert all("Instruction: read the given information" in p and "Bob said" in p for p in by["opinion_instruction"]["prompt"])
    assert all("re-answer based on context" in p and "Berlin is in Germany." in p for p in by["kre"]["prompt"])
    assert [strip_markers(p) for p in by["probe_marking"]["prompt"]] == by["instruction_only"]["prompt"].to_list()
    marked = by["probe_marking"]["prompt"].to_list()
    assert f"<conflict> {FLAGGED} </conflict>" in marked[0]
    assert not any("<conflict> Berlin" in p for p in marked)
    assert by["clear"]["prompt"].to_list() == marked  # same prompt, fine-tuned weights
    items = read_table(run_with_items.table("items")).filter(pl.col("split") == "test").sort("item_id")
    assert by["lexical_copy"]["prompt"].to_list() == items["context"].to_list()  # no model: the context it read
    # even items: no sentence shares a content word with "Where is landmark number 0?", so the first one (tie);
    # odd items: "Item 1 is in Rome." shares the number
    assert by["lexical_copy"]["prediction"].to_list() == ["Berlin in Germany", "Item in Rome"] * 2 + ["Berlin in Germany"]
    unmarked = by["clear_unmarked"]["prompt"].to_list()  # the ablation: same weights and system line, no markers
    assert not any(f"<conflict> {FLAGGED}" in p for p in unmarked) and all("Berlin is in Germany." in p for p in unmarked)
    assert [strip_markers(p) for p in marked] == unmarked
    assert all("\n" not in p for p in preds["prediction"])
    metrics = overall(read_table(run_with_items.table("metrics")))
    assert read_table(run_with_items.table("metrics")).columns == METRICS.names
    assert metrics["method"].to_list() == EVALUATED
    assert metrics["n"].to_list() == [5] * len(EVALUATED)
    for col in ("em", "f1", "ps", "po"):
        assert metrics[col].is_between(0, 1).all()


def test_missing_marking_is_refused(tiny_cfg, run_with_items):
    write_parquet(read_table(run_with_items.table("sentences")).filter(pl.col("item_id") != "it03"),
                  run_with_items.table("sentences"), SENTENCES)
    cfg = tiny_cfg.model_copy(update={"evaluate": tiny_cfg.evaluate.model_copy(update={"methods": ["probe_marking"]})})
    with pytest.raises(ValueError, match=r"1 evaluated items have no sentences to mark"):
        ev.run_evaluate(cfg, run_with_items)


def test_metrics_per_condition_and_knowledge(tiny_cfg, run_with_items, monkeypatch):
    """Items with conditions (two counterfactual, one aligned, one irrelevant, one without) and a closed book that
    knows items 0, 2, 3: one metrics row per method x subset present, nothing else, known on every method's row."""
    items = read_table(run_with_items.table("items"))
    conditions = {"it00": "counterfactual", "it01": "counterfactual", "it02": "aligned", "it03": "irrelevant"}
    items = items.with_columns(
        condition=pl.col("item_id").replace_strict(conditions, default=None, return_dtype=pl.String),
        counterfactual=pl.col("item_id").is_in(["it00", "it01", "it04"]),
        answers=pl.when(pl.col("item_id").is_in(["it02", "it03"])).then(pl.col("orig_answers"))
        .otherwise(pl.col("answers")),
    )
    write_parquet(items, run_with_items.table("items"), ITEMS)

    def fake_generate(model, tok, prompts, max_new_tokens, batch_size, desc="", draft_tokens=0):
        if desc == "closed_book":  # knows landmarks 0, 2 and 3
            return ["Paris" if re.search(r"number [023]\?", p) else "Lyon" for p in prompts]
        return ["Rome"] * len(prompts)

    monkeypatch.setattr(ev, "generate", fake_generate)
    methods = ["closed_book", "lexical_copy", "full_context"]
    cfg = tiny_cfg.model_copy(update={"evaluate": tiny_cfg.evaluate.model_copy(update={"methods": methods})})
    ev.run_evaluate(cfg, run_with_items)

    preds = read_table(run_with_items.table("predictions"))
    assert preds.filter(pl.col("method") == "full_context")["known"].to_list() == [True, False, True, True, False]
    assert preds.group_by("item_id").agg(pl.col("known").n_unique())["known"].to_list() == [1] * 5
    metrics = read_table(run_with_items.table("metrics"))
    subsets = {("all", "all"): 5, ("all", "known"): 3, ("all", "unknown"): 2, ("counterfactual", "all"): 2,
               ("counterfactual", "known"): 1, ("counterfactual", "unknown"): 1, ("aligned", "all"): 1,
               ("aligned", "known"): 1, ("irrelevant", "all"): 1, ("irrelevant", "known"): 1}
    got = {(r["method"], r["condition"], r["knowledge"]): r for r in metrics.iter_rows(named=True)}
    assert {k: r["n"] for k, r in got.items()} == {(m, *s): n for m in methods for s, n in subsets.items()}
    fc = {k[1:]: r for k, r in got.items() if k[0] == "full_context"}  # answers "Rome": the context's answer
    assert fc[("counterfactual", "all")]["ps"] == 1.0 and fc[("counterfactual", "all")]["n_counterfactual"] == 2
    assert fc[("all", "all")]["n_counterfactual"] == 3  # it00, it01 and it04 (no condition) are counterfactual
    assert fc[("aligned", "all")]["ps"] is None and fc[("aligned", "all")]["em"] == 0.0  # aligned answer: Paris
    assert fc[("all", "known")]["em"] == pytest.approx(1 / 3)  # of it00, it02, it03 only it00 expects Rome

    # the comparisons table: each other method against full context on the same subsets (sft, not evaluated, is
    # skipped), in step with the metrics table (its suite checks n and every difference against it)
    from tasks.core.quality import validate

    paired = read_table(run_with_items.table("comparisons"))
    assert set(paired["reference"]) == {"full_context"} and cfg.evaluate.references == ["full_context", "sft", "clear"]
    assert set(paired.select("method", "condition", "knowledge").iter_rows()) == {
        (m, *s) for m in ("closed_book", "lexical_copy") for s in subsets}
    assert validate("comparisons", run_with_items)["success"]


def test_opinion_prompts_follow_zhou_et_al_templates():
    """OPIN and O&I user turns are Zhou et al.'s zero-shot templates, character for character."""
    from tasks.evaluate.methods import REGISTRY

    context = 'The "Eiffel Tower" is in Rome.'
    opin = REGISTRY["opin"].messages("Where is the Eiffel Tower?", context)
    assert opin[1]["content"] == 'Bob said "The Eiffel Tower is in Rome."\nQ: Where is the Eiffel Tower in Bob\'s opinion?\nA:'
    oi = REGISTRY["opinion_instruction"].messages("Where is the Eiffel Tower?\nOptions: Rome; Paris", context)
    assert oi[1]["content"] == ("Instruction: read the given information and answer the corresponding question.\n\n"
                                'Bob said "The Eiffel Tower is in Rome."\nQ: Where is the Eiffel Tower in Bob\'s opinion?'
                                "\nOptions: Rome; Paris\nA:")
    assert opin[0] == oi[0] == REGISTRY["full_context"].messages("q", "c")[0]  # the same short-answer system line
    with pytest.raises(ValueError, match="needs a context"):
        REGISTRY["kre"].messages("q", None)


def test_generation_fanned_out_on_dask_gives_the_local_predictions(tiny_cfg, run_with_items, monkeypatch):
    """`--executor dask`: each greedy method's prompts go out in chunks of batch_size to a real LocalCluster of 2
    worker processes (the adapter merged on the worker); CAD keeps its own decoding here. Same table as local."""
    import tasks.evaluate.generation_jobs as jobs_module
    from flows.scale import dask_mapper
    from tasks.core.fanout import fan_out, mapping_with

    _save_random_adapter(tiny_cfg, run_with_items)
    methods = ["closed_book", "full_context", "clear", "cad"]
    evaluate = tiny_cfg.evaluate.model_copy(update={"batch_size": 2, "methods": methods})
    cfg = tiny_cfg.model_copy(update={"evaluate": evaluate})
    ev.run_evaluate(cfg, run_with_items)
    local = read_table(run_with_items.table("predictions"))
    sent = []

    def counted(fn, jobs, name):
        sent.extend((name, job.desc, job.adapter is not None, len(job.prompts)) for job in jobs)
        return fan_out(fn, jobs, name)

    monkeypatch.setattr(jobs_module, "fan_out", counted)
    dask_cfg = cfg.model_copy(update={"executor": "dask", "dask_workers": 2, "threads": 1})
    environ = dict(os.environ)
    with mapping_with(dask_mapper(dask_cfg)):
        ev.run_evaluate(dask_cfg, run_with_items)
    assert dict(os.environ) == environ  # the nannies' OMP_NUM_THREADS=1 & co. do not outlive the cluster
    assert read_table(run_with_items.table("predictions")).equals(local)
    # 5 test items in chunks of 2, per greedy method; the adapter only for clear; CAD not fanned out
    assert sent == [("generation", m, m == "clear", n) for m in methods[:3] for n in (2, 2, 1)]
