"""Ingest of the offline known-facts benchmark, v1 (kept reproducible): splits, counterfactuals, contexts, rejects.

v2, the default, is tested in tests/test_known_facts_v2.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from flows.stages import STAGES
from schemas.tables import ITEMS, REJECTS, STATEMENTS
from tasks.core.config import RunConfig
from tasks.ingest.stage import KNOWN_FACTS_PATH, RELATION_TEMPLATES, ingest, make_sentence, run_ingest
from tasks.core.splitter import split_sentences
from tasks.core.storage import RunPaths, read_table, text_key


V1 = {"known_facts_version": "1"}


def _cfg(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig.model_validate({"run": "t", "runs_dir": str(tmp_path / "runs"), "ingest": V1, **kw})


@pytest.fixture(scope="module")
def full():
    """The whole bundled benchmark with the default seed."""
    return ingest(RunConfig(run="t", ingest=V1))


def _good(kid: int, subject: str, obj: str, rel: str = "P19") -> dict:
    return {"known_id": kid, "subject": subject, "attribute": obj, "relation_id": rel,
            "template": "{} was born in", "prompt": f"{subject} was born in"}


def test_bundled_file_relations_all_have_templates():
    records = json.loads(KNOWN_FACTS_PATH.read_text())
    relations = {r["relation_id"] for r in records}
    assert len(relations) == 32 and relations <= set(RELATION_TEMPLATES)
    for rel, (question, sentence) in RELATION_TEMPLATES.items():
        assert question.count("{}") == 1 and question.endswith("?")
        assert sentence.endswith(".") and "{s}" in sentence and "{o}" in sentence
    bodies = [s.replace("{a} ", "") for _, s in RELATION_TEMPLATES.values()]
    assert len(set(bodies)) == len(bodies), "two relations share a sentence template"


def test_full_benchmark_counts_and_splits(full):
    assert full.n_read == 804 and full.n_read == full.n_kept + len(full.rejects)
    assert len(full.items) == full.n_kept and len(full.statements) == 2 * full.n_kept
    splits_of: dict[str, set] = {}
    for it in full.items:
        splits_of.setdefault(it["group"], set()).add(it["split"])
    assert all(len(s) == 1 for s in splits_of.values()), "a subject straddles splits"
    n_subj = Counter(next(iter(s)) for s in splits_of.values())
    total = sum(n_subj.values())
    assert abs(n_subj["train"] / total - 0.6) < 0.02 and abs(n_subj["test"] / total - 0.2) < 0.02
    assert len({it["item_id"] for it in full.items}) == len(full.items)


def test_counterfactuals_and_contexts(full):
    objects: dict[str, set] = {}
    for r in json.loads(KNOWN_FACTS_PATH.read_text()):
        objects.setdefault(r["relation_id"], set()).add(r["attribute"])
    distractor_labels: Counter = Counter()
    text_label = {s["text"]: s["label"] for s in full.statements}
    stmt_split = {s["text"]: s["split"] for s in full.statements}
    for it in full.items:
        cf, orig = it["answers"][0], it["orig_answers"][0]
        assert cf != orig and cf in objects[it["relation_id"]]
        assert it["counterfactual"] is True
        assert it["target_sentence"] == make_sentence(it["relation_id"], it["group"], cf)
        assert it["target_sentence"] in it["context"]
        true_sentence = make_sentence(it["relation_id"], it["group"], orig)
        assert it["orig_context"] == it["context"].replace(it["target_sentence"], true_sentence)
        assert it["question"].endswith("?") and it["group"] in it["question"]
        # every sentence is a known statement of the same split; distractors are about other subjects
        sents = [t for t, _, _ in split_sentences(it["context"])]
        assert len(sents) == 4 and sents.count(it["target_sentence"]) == 1
        for sent in sents:
            assert sent in text_label and stmt_split[sent] == it["split"]
            if sent != it["target_sentence"]:
                assert not sent.startswith(it["group"] + " ")
                distractor_labels[text_label[sent]] += 1
    # contexts mix true and false distractors
    total = sum(distractor_labels.values())
    assert distractor_labels[0] > 0.2 * total and distractor_labels[1] > 0.2 * total


def test_statements_balanced_and_keyed(full):
    labels = Counter(s["label"] for s in full.statements)
    assert labels[0] == labels[1] == full.n_kept
    assert len({s["stmt_id"] for s in full.statements}) == len(full.statements)
    assert len({s["key"] for s in full.statements}) == len(full.statements), "one text with two labels"
    assert all(s["key"] == text_key(s["text"]) for s in full.statements)
    item_split = {it["group"]: it["split"] for it in full.items}
    assert all(s["split"] == item_split[s["group"]] for s in full.statements)


def test_seed_changes_output():
    a, b = ingest(RunConfig(run="t", seed=0, ingest=V1)), ingest(RunConfig(run="t", seed=1, ingest=V1))
    assert [i["split"] for i in a.items] != [i["split"] for i in b.items]
    assert [i["answers"] for i in a.items] != [i["answers"] for i in b.items]
    assert [i["context"] for i in a.items] != [i["context"] for i in b.items]
    assert ingest(RunConfig(run="t", seed=0, ingest=V1)).items == a.items  # and the same seed reproduces it


@pytest.mark.parametrize("limit", [10, 60])
def test_limit_keeps_all_splits(limit):
    out = ingest(RunConfig(run="t", limit=limit, ingest=V1))
    assert out.n_read == limit and out.n_kept + len(out.rejects) == limit and out.n_kept <= limit
    assert {i["split"] for i in out.items} == {"train", "dev", "test"}
    for it in out.items:  # small splits: fewer distractors, but the target is always there
        assert it["target_sentence"] in it["context"]


def test_broken_records_are_rejected(tmp_path):
    records = [
        _good(1, "Eavan Boland", "Dublin"),
        _good(2, "Henri Debain", "Paris"),
        _good(3, "Emilia Rydberg", "Stockholm"),
        _good(4, "Nicolas Gigault", "Paris"),
        {k: v for k, v in _good(5, "Anna Lindh", "Stockholm").items() if k != "attribute"},  # missing
        _good(6, "Olof Palme", "Stockholm", rel="P9999"),  # unknown relation
        _good(7, "Eavan Boland", "Cork"),  # duplicate (subject, relation)
        _good(8, "  ", "Rome"),  # empty subject
        {**_good(9, "Greta Garbo", "Stockholm"), "subject": 42},  # wrong type
        _good(10, "Iron Man", "Avengers", rel="P463"),  # relation with a single object
        _good(11, "Bad {subject}", "Oslo"),  # sentence cannot be formed
        "not a record",
        _good(3, "Astrid Lindgren", "Vimmerby"),  # known_id reused
        _good(14, "Guccio Gucci", "Firenze S.p.A."),  # would merge with the next sentence of a context
    ]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    cfg = _cfg(tmp_path, data_path=str(path))
    paths = RunPaths(tmp_path / "runs" / "t")
    run_ingest(cfg, paths)
    rejects = read_table(paths.table("rejects"))
    items = read_table(paths.table("items"))
    assert rejects.height + items.height == len(records)
    reason = dict(zip(rejects["record"].to_list(), rejects["reason"].to_list()))
    assert reason == {
        4: "missing_field", 5: "unknown_relation", 6: "duplicate", 7: "empty_field", 8: "wrong_type",
        9: "no_counterfactual", 10: "unformable_sentence", 11: "not_an_object", 12: "duplicate_id",
        13: "unformable_sentence",
    }
    raw = json.loads(rejects.filter(pl.col("record") == 6)["raw"][0])
    assert raw["attribute"] == "Cork" and rejects.filter(pl.col("record") == 6)["record_id"][0] == "kf-7"
    assert sorted(items["item_id"].to_list()) == ["kf-1", "kf-2", "kf-3", "kf-4"]
    # written tables follow their schemas exactly
    for name, schema in (("items", ITEMS), ("statements", STATEMENTS), ("rejects", REJECTS)):
        assert read_table(paths.table(name)).to_arrow().schema.names == schema.names


def test_run_ingest_summary_line(tmp_path, caplog):
    caplog.set_level("INFO", logger="tasks")
    paths = RunPaths(tmp_path / "runs" / "t")
    run_ingest(_cfg(tmp_path, limit=40), paths)
    line = [r.getMessage() for r in caplog.records if r.name == "tasks.ingest.stage"][-1]
    assert line.startswith("known-facts: 40 read, 40 kept, 0 rejected")
    assert STAGES["ingest"].writes == ("items", "statements", "rejects", "ingest_provenance")
    assert all(paths.artifact(a).exists() for a in STAGES["ingest"].writes)
    prov = json.loads(paths.ingest_provenance.read_text())
    assert prov["files"][0]["path"] == str(KNOWN_FACTS_PATH) and prov["files"][0]["role"] == "data"
    assert prov["loaders"]["data"] == {"dataset": "known-facts", "version": "1"}
    assert prov["counts"]["known-facts"] == {"read": 40, "kept": 40, "rejected": 0, "by_reason": {}}


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="known-facts"):
        ingest(_cfg(tmp_path, dataset="no-such-dataset"))


def test_sentence_grammar_helpers():
    assert make_sentence("P106", "Felix Salmon", "actor") == "Felix Salmon works as an actor."
    assert make_sentence("P413", "Drake Britton", "pitcher") == "Drake Britton plays as a pitcher."
    assert make_sentence("P495", "samurai cinema", "Japan") == "Samurai cinema comes from Japan."
    assert make_sentence("P178", "iPhone", "Apple") == "iPhone was developed by Apple."
    assert make_sentence("P127", "Fendi", "Salvatore Ferragamo S.p.A.") == "Fendi is owned by Salvatore Ferragamo S.p.A."
