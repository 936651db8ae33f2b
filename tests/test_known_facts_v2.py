"""known-facts v2, the offline default: wordings unseen by fine-tuning, three distractor kinds, KAFT's three
conditions, per-sentence labels, and the errors of options that cannot be met."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from schemas.tables import CONDITIONS
from tasks.core.config import RunConfig
from tasks.core.splitter import split_sentences
from tasks.core.storage import RunPaths, read_table
from tasks.ingest.formats import READERS, ReadOptions
from tasks.ingest.formats.known_facts_templates import PARAPHRASES, render_sentence
from tasks.ingest.stage import KNOWN_FACTS_PATH, RELATION_TEMPLATES, ingest, run_ingest

DEFAULT = RunConfig(run="t")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunPaths:
    """The default ingest of the bundled file, written as a run's tables."""
    root = tmp_path_factory.mktemp("v2")
    paths = RunPaths(root / "t")
    run_ingest(RunConfig(run="t", runs_dir=root), paths)
    return paths


@pytest.fixture(scope="module")
def items(run) -> list[dict]:
    return read_table(run.table("items")).to_dicts()


@pytest.fixture(scope="module")
def facts_of(run) -> dict[str, tuple[str, str, str, int]]:
    """Statement text -> (subject, relation, split, label): which fact each sentence states, and how."""
    st = read_table(run.table("statements"))
    return {r["text"]: (r["group"], r["relation_id"], r["split"], r["label"]) for r in st.iter_rows(named=True)}


def test_paraphrase_table():
    assert set(PARAPHRASES) == set(RELATION_TEMPLATES)
    bodies = []
    for rel, (questions, sentences) in PARAPHRASES.items():
        assert len(set(questions)) >= 3 and len(set(sentences)) >= 3, rel
        assert all(q.count("{s}") == 1 and q.endswith("?") for q in questions)
        assert all(s.count("{s}") == 1 and s.count("{o}") == 1 and s.endswith(".") for s in sentences)
        assert questions[0].replace("{s}", "{}") == RELATION_TEMPLATES[rel][0]  # the first wording is v1's
        bodies += [s.replace("{a} ", "") for s in sentences]
    assert len(set(bodies)) == len(bodies), "two wordings (of one or two relations) coincide"


def test_default_is_v2_with_its_own_version(run):
    prov = json.loads(run.ingest_provenance.read_text())
    assert prov["loaders"]["data"] == {"dataset": "known-facts", "version": "2"}
    assert prov["options"]["known_facts"]["known_facts_version"] == "2"


def test_no_test_wording_among_training_items_sql(run):
    """The issue's check: no (question template, sentence template) pair of a test item among train items."""
    items = str(run.table("items"))
    sql = f"""
        SELECT count(*) FROM read_parquet('{items}') t
        WHERE t.split = 'test' AND EXISTS (
            SELECT 1 FROM read_parquet('{items}') r
            WHERE r.split = 'train' AND r.question_template = t.question_template
              AND r.sentence_template IS NOT DISTINCT FROM t.sentence_template)
    """
    assert duckdb.sql(sql).fetchall()[0][0] == 0
    # stronger: neither wording of a test item is used by any train item, nor by any sentence in a train context
    for kind in ("question_template", "sentence_template"):
        shared = f"""
            SELECT count(*) FROM read_parquet('{items}') t JOIN read_parquet('{items}') r
            ON t.{kind} = r.{kind} WHERE t.split = 'test' AND r.split = 'train'
        """
        assert duckdb.sql(shared).fetchall()[0][0] == 0, kind


def test_test_wordings_never_in_training_contexts(items, facts_of):
    """No sentence of a test context appears in a train context; each states a fact of the test split."""
    test_sentences = {lab["text"] for it in items if it["split"] == "test" for lab in it["sentence_labels"]}
    train_sentences = {lab["text"] for it in items if it["split"] == "train" for lab in it["sentence_labels"]}
    assert not test_sentences & train_sentences
    assert all(facts_of[t][2] == "test" for t in test_sentences)


def test_conditions_and_budget(items):
    by_split = Counter((it["split"], it["condition"]) for it in items)
    assert {c for s, c in by_split if s != "test"} == {"counterfactual"}
    per_cond = [by_split["test", c] for c in CONDITIONS]
    assert max(per_cond) - min(per_cond) <= 1 and 150 <= sum(per_cond) <= 200, per_cond
    assert len({it["item_id"] for it in items}) == len(items)
    for it in items:
        assert it["item_id"] == f"kf-{it['source_id']}-{it['condition']}"
        assert it["counterfactual"] == (it["condition"] == "counterfactual")
        assert it["orig_answers"] and (it["answers"] == it["orig_answers"]) == (it["condition"] != "counterfactual")


def test_sentence_labels_relevance_and_objects(items, facts_of):
    for it in items:
        labels = it["sentence_labels"]
        assert [lab["text"] for lab in labels] == [t for t, _, _ in split_sentences(it["context"])]
        assert all(lab["truthful"] is not None and lab["relevant"] is not None for lab in labels)
        relevant = [lab for lab in labels if lab["relevant"]]
        about = [lab for lab in labels if facts_of[lab["text"]][:2] == (it["group"], it["relation_id"])]
        assert about == relevant, "relevant = the sentences about the question's subject and relation"
        for lab in labels:  # truth agrees with the probe statements, in the item's split
            subject, rel, split, label = facts_of[lab["text"]]
            assert split == it["split"] and lab["truthful"] == (label == 0)
        if it["condition"] == "irrelevant":
            assert not relevant and it["target_sentence"] is None and it["sentence_template"] is None
            continue
        assert len(relevant) == 1 and relevant[0]["text"] == it["target_sentence"]
        stated = render_sentence(it["sentence_template"], it["group"], it["answers"][0])
        assert it["target_sentence"] == stated and relevant[0]["truthful"] == (it["condition"] == "aligned")


def test_distractor_kinds_present_where_the_data_allows(items, facts_of):
    per_split: dict[str, set] = {}
    for subject, rel, split, _ in facts_of.values():
        per_split.setdefault(split, set()).add((subject, rel))
    kinds: Counter = Counter()
    for it in items:
        facts = [facts_of[lab["text"]][:2] for lab in it["sentence_labels"] if not lab["relevant"]]
        same_rel = [f for f in facts if f[1] == it["relation_id"] and f[0] != it["group"]]
        same_subj = [f for f in facts if f[0] == it["group"] and f[1] != it["relation_id"]]
        pool = per_split[it["split"]]
        n_rel = len({f for f in pool if f[1] == it["relation_id"] and f[0] != it["group"]})
        n_subj = len({f for f in pool if f[0] == it["group"] and f[1] != it["relation_id"]})
        assert len(same_rel) == min(2, n_rel) and len(same_subj) == min(1, n_subj), it["item_id"]
        truth = Counter(lab["truthful"] for lab in it["sentence_labels"] if not lab["relevant"])
        kinds.update(same_rel=bool(same_rel), same_subj=bool(same_subj), both_truths=len(truth) == 2)
    assert kinds["same_rel"] > 0.9 * len(items) and kinds["same_subj"] > 0 and kinds["both_truths"] > 0.5 * len(items)


def test_every_condition_per_fact_and_holdout():
    out = ingest(RunConfig(run="t", limit=300, ingest={"test_conditions_per_fact": 3, "holdout_relations": ["P19"]}))
    test = Counter(it["source_id"] for it in out.items if it["split"] == "test")
    assert test and set(test.values()) == {3}
    train = [it for it in out.items if it["split"] == "train"]
    assert train and all(it["relation_id"] != "P19" for it in train)
    p19 = {s["text"] for s in out.statements if s["relation_id"] == "P19"}
    assert not {lab["text"] for it in train for lab in it["sentence_labels"]} & p19
    assert any(s["split"] == "train" for s in out.statements if s["relation_id"] == "P19")  # statements stay
    assert any(it["relation_id"] == "P19" for it in out.items if it["split"] == "test")


def test_truncated_labels_follow_the_context():
    opts = ReadOptions(limit=200, max_context_tokens=25, truncation="truncate", count_tokens=lambda t: len(t.split()))
    out = READERS["known-facts"].read(None, opts)
    cut = [it for it in out.items if it["truncated"]]
    assert cut
    for it in cut:
        assert [lab["text"] for lab in it["sentence_labels"]] == [t for t, _, _ in split_sentences(it["context"])]


def test_v1_items_gain_only_condition_and_labels():
    out = ingest(RunConfig(run="t", limit=60, ingest={"known_facts_version": "1"}))
    for it in out.items:
        assert it["condition"] == "counterfactual" and it["question_template"] is None
        relevant = [lab["text"] for lab in it["sentence_labels"] if lab["relevant"]]
        assert relevant == [it["target_sentence"]]
        assert [lab["text"] for lab in it["sentence_labels"]] == [t for t, _, _ in split_sentences(it["context"])]


def test_unknown_relation_is_a_reject_row(tmp_path):
    records = json.loads(KNOWN_FACTS_PATH.read_text())
    records.append({"known_id": 99999, "subject": "Olof Palme", "attribute": "Stockholm", "relation_id": "P9999"})
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    out = READERS["known-facts"].read(path, ReadOptions())
    assert out.n_read == len(records) == out.n_kept + len(out.rejects)
    (rej,) = out.rejects
    assert rej["reason"] == "unknown_relation" and rej["record"] == len(records) - 1 and "P9999" in rej["detail"]


@pytest.mark.parametrize(
    ("ingest_opts", "option"),
    [
        ({"same_relation_distractors": 40}, "same_relation_distractors=40"),
        ({"same_subject_distractors": 2}, "same_subject_distractors=2"),
        ({"unrelated_distractors": 5000}, "unrelated_distractors=5000"),
        ({"holdout_relations": ["P9999"]}, "holdout_relations="),
        ({"holdout_relations": sorted(PARAPHRASES)}, "holdout_relations="),
    ],
)
def test_unmeetable_option_is_one_error_line(ingest_opts, option):
    with pytest.raises(ValueError) as err:
        ingest(RunConfig(run="t", limit=30, ingest=ingest_opts))  # checked on the whole file, even under a limit
    message = str(err.value)
    assert message.startswith(f"ingest.{option}") and "\n" not in message


def test_small_file_refuses_default_distractors(tmp_path):
    """A file too small for the defaults names the option and the most it allows."""
    records = [{"known_id": i, "subject": s, "attribute": o, "relation_id": "P19"}
               for i, (s, o) in enumerate([("Ann Lee", "Paris"), ("Bo Chen", "Rome"), ("Cy Young", "Oslo")])]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"^ingest\.same_relation_distractors=2 cannot be met: the \w+ split"):
        READERS["known-facts"].read(path, ReadOptions())


def test_v1_and_v2_never_share_a_cache_entry(tmp_path):
    from tasks.ingest.provenance import provenance_of
    from tasks.ingest.sources import run_sources

    keys = set()
    for version in ("1", "2"):
        cfg = RunConfig(run="t", runs_dir=tmp_path, ingest={"known_facts_version": version})
        prov = provenance_of(cfg, run_sources(cfg))
        assert prov["loaders"]["data"]["version"] == version
        keys.add(prov["cache_key"])
    assert len(keys) == 2
