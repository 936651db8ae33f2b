"""Sentence splitting with exact offsets, and the labelled `sentences` table."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import tasks.core.splitter as dec
from schemas.tables import ITEMS, SENTENCES, STATEMENTS
from tasks.core.config import RunConfig
from tasks.decompose.stage import run_decompose
from tasks.core.splitter import split_sentences
from tasks.ingest.stage import run_ingest
from tasks.core.storage import RunPaths, read_table, text_key, write_parquet


def _exact(text: str, spans) -> None:
    for sent, start, end in spans:
        assert text[start:end] == sent and sent == sent.strip() and sent
    starts = [s for _, s, _ in spans]
    assert starts == sorted(starts)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("He moved to St. Louis in 1990. The U.S. is large.", ["He moved to St. Louis in 1990.", "The U.S. is large."]),
        ("Mario Bros. was developed by Nintendo. Fluminense F.C. is located in the country of Brazil.",
         ["Mario Bros. was developed by Nintendo.", "Fluminense F.C. is located in the country of Brazil."]),
        ("  Dr. Smith works at Acme Corp. in Ohio.  \n\n It is in Washington, D.C., near the U.S. Capitol. Really? Yes!  ",
         ["Dr. Smith works at Acme Corp. in Ohio.", "It is in Washington, D.C., near the U.S. Capitol.", "Really?", "Yes!"]),
        ("Fendi is owned by Salvatore Ferragamo Italia S.p.A., in Florence. iPhone was developed by Apple.",
         ["Fendi is owned by Salvatore Ferragamo Italia S.p.A., in Florence.", "iPhone was developed by Apple."]),
        ("No final period here", ["No final period here"]),
    ],
)
def test_split_sentences_offsets_and_abbreviations(text, expected):
    spans = split_sentences(text)
    _exact(text, spans)
    assert [s for s, _, _ in spans] == expected


def test_sentence_ending_in_abbreviation_stays_whole():
    """pysbd keeps an ambiguous "S.p.A. Next" together: never a cut inside, offsets still exact."""
    text = "Fendi is owned by Salvatore Ferragamo Italia S.p.A. Audible.com is owned by Amazon."
    spans = split_sentences(text)
    _exact(text, spans)
    assert "".join(s for s, _, _ in spans).replace(" ", "") == text.replace(" ", "")
    assert all(not s.startswith("p.A.") and not s.endswith("S.") for s, _, _ in spans)


def test_split_sentences_empty():
    assert split_sentences("") == [] and split_sentences("  \n ") == []


def test_fallback_when_pysbd_loses_or_misplaces_spans(monkeypatch):
    """pysbd drops sentences it cannot locate; the uncovered text must still come back, exactly."""
    from pysbd.utils import TextSpan

    text = "First one here. Second one here. Third one here."

    class Lossy:
        def segment(self, t):
            return [TextSpan("First one here. ", 0, 16), TextSpan("garbage", 30, 37)]

    monkeypatch.setattr(dec, "_segmenter", lambda: Lossy())
    spans = split_sentences(text)
    _exact(text, spans)
    assert [s for s, _, _ in spans] == ["First one here.", "Second one here.", "Third one here."]

    class Broken:
        def segment(self, t):
            raise RuntimeError("boom")

    monkeypatch.setattr(dec, "_segmenter", lambda: Broken())
    assert [s for s, _, _ in split_sentences(text)] == ["First one here.", "Second one here.", "Third one here."]


def test_real_benchmark_offsets_and_labels(tmp_path):
    """Every sentence of every context of the bundled benchmark: exact offsets, known truth, right label."""
    cfg = RunConfig(run="t", runs_dir=tmp_path, ingest={"known_facts_version": "1"})  # v1: one conflict per item
    paths = RunPaths(tmp_path / "t")
    run_ingest(cfg, paths)
    run_decompose(cfg, paths)  # its speed is not asserted here: timings on shared machines are noise
    sents = read_table(paths.table("sentences"))
    items = read_table(paths.table("items"))
    stmts = read_table(paths.table("statements"))
    assert sents.to_arrow().schema.names == SENTENCES.names
    assert set(sents["item_id"]) == set(items["item_id"])
    ctx = dict(zip(items["item_id"], items["context"]))
    target = dict(zip(items["item_id"], items["target_sentence"]))
    for row in sents.iter_rows(named=True):
        assert ctx[row["item_id"]][row["char_start"]:row["char_end"]] == row["text"]
        assert row["key"] == text_key(row["text"]) and row["relevance"] is None
        expected = "conflict" if row["text"] == target[row["item_id"]] else "irrelevant"
        assert row["label"] == expected
    # exactly one conflict sentence per item; every sentence's truth is known from the statements
    per_item = sents.group_by("item_id").agg((pl.col("label") == "conflict").sum().alias("n"))
    assert per_item["n"].to_list() == [1] * items.height
    assert sents["truthful"].null_count() == 0
    truth = dict(zip(stmts["key"], stmts["label"]))
    assert all(truthful == (truth[k] == 0) for k, truthful in zip(sents["key"], sents["truthful"]))
    assert not sents.filter(pl.col("label") == "conflict")["truthful"].any()
    # the target sentence is conflicting; no other sentence is (null: unknown, never a guess)
    assert sents.filter(pl.col("label") == "conflict")["conflicting"].to_list() == [True] * items.height
    assert all(c is None or c == (lab == "conflict") for c, lab in zip(sents["conflicting"], sents["label"]))
    # sentence indexes are 0..n-1 in order of position
    for _, g in sents.group_by("item_id"):
        assert g.sort("char_start")["sent_idx"].to_list() == list(range(g.height))


def test_labels_aligned_unknown_and_untrusted(tmp_path):
    """Aligned targets, items without a target (label unknown) and statements stated both ways."""
    paths = RunPaths(tmp_path / "t")
    base = {"dataset": "x", "split": "test", "group": "g", "relation_id": None, "question": "Q?",
            "answers": ["a"], "orig_answers": None, "orig_context": None}
    items = [
        {**base, "item_id": "a", "context": "Paris is in France. Rome is in Spain.",
         "target_sentence": "Paris is in France.", "counterfactual": False},
        {**base, "item_id": "b", "context": "Oslo is in Norway. Bern is in Chile.",
         "target_sentence": None, "counterfactual": True},
    ]
    stmts = [
        {"stmt_id": "1", "key": text_key("Paris is in France."), "text": "Paris is in France.", "label": 0, "group": "p", "split": "test"},
        {"stmt_id": "2", "key": text_key("Bern is in Chile."), "text": "Bern is in Chile.", "label": 1, "group": "b", "split": "test"},
        {"stmt_id": "3", "key": text_key("Bern is in Chile."), "text": "Bern is in Chile.", "label": 0, "group": "b", "split": "test"},
    ]
    write_parquet(items, paths.table("items"), ITEMS)
    write_parquet([{**s, "relation_id": None} for s in stmts], paths.table("statements"), STATEMENTS)
    run_decompose(RunConfig(run="t"), paths)
    sents = read_table(paths.table("sentences"))
    got = {r["text"]: (r["label"], r["truthful"]) for r in sents.iter_rows(named=True)}
    assert got == {
        "Paris is in France.": ("aligned", True),
        "Rome is in Spain.": ("irrelevant", None),
        "Oslo is in Norway.": (None, None),
        "Bern is in Chile.": (None, None),  # contradictory statements: truth unknown
    }
    assert Path(paths.table("sentences")).exists()


def _one_item(paths: RunPaths) -> None:
    """One item whose first sentence holds two facts, the second none, the third one."""
    item = {"item_id": "a", "dataset": "x", "split": "test", "group": "g", "relation_id": None,
            "question": "What is the capital of France?",
            "context": "Paris is the capital of France and Paris lies on the Seine. Hello there! Berlin is in Germany.",
            "answers": ["Paris"], "orig_answers": None, "orig_context": None,
            "target_sentence": "Paris is the capital of France and Paris lies on the Seine.", "counterfactual": False}
    write_parquet([item], paths.table("items"), ITEMS)


def test_llm_facts_and_relevance_through_the_stage(server, tmp_path, monkeypatch):
    """Atomic facts from an OpenAI-compatible endpoint keep their source sentence; a rerun makes no call."""
    from flows.stages import STAGES
    from tasks.core.quality import validate_tables

    monkeypatch.setenv("CLEARFLOW_CACHE", str(tmp_path / "cache"))
    from tests.llm_server import _facts_reply

    steps_reply = "Steps:\n1. Which city is the capital of France?"
    server.reply_fn = lambda body: steps_reply if "Question:" in body["messages"][-1]["content"] else _facts_reply(body)
    paths = RunPaths(tmp_path / "t")
    _one_item(paths)
    llm = {"backend": "openai", "base_url": server.base_url, "model": "test-model", "max_retries": 0}
    cfg = RunConfig.model_validate({"run": "t", "decompose": {"method": "llm", "llm": llm, "relevance": True, "top_k": 1}})
    run_decompose(cfg, paths)
    sents = read_table(paths.table("sentences"))
    got = [(r["text"], r["unit"], r["source_idx"], r["char_start"], r["label"]) for r in sents.iter_rows(named=True)]
    first_end = len("Paris is the capital of France and Paris lies on the Seine.")
    assert got == [
        ("Paris is the capital of France.", "fact", 0, 0, "aligned"),
        ("Paris lies on the Seine.", "fact", 0, 0, "aligned"),
        ("Hello there!", "sentence", 1, first_end + 1, "irrelevant"),
        ("Berlin is in Germany.", "fact", 2, first_end + 14, "irrelevant"),
    ]
    # one LLM step, top-1: exactly the capital fact is kept, and it is the most relevant unit
    assert sents["is_relevant"].to_list() == [True, False, False, False] and sents["relevance"].arg_max() == 0
    assert validate_tables(STAGES["decompose"].suites, paths)["sentences"]["success"]
    calls = len(server.requests)
    run_decompose(cfg, paths)
    assert len(server.requests) == calls  # every reply came from the cache


# ---------------------------------------------------------------- labels per unit (truthful, relevant, conflicting)

_ITEM = {"dataset": "x", "split": "test", "group": "g", "relation_id": None, "answers": ["a"], "orig_answers": None,
         "orig_context": None}


def _label(text: str, truthful: bool | None, relevant: bool | None) -> dict:
    return {"text": text, "truthful": truthful, "relevant": relevant}


def _labels_of(paths: RunPaths) -> dict[tuple[str, str], tuple]:
    sents = read_table(paths.table("sentences"))
    return {(r["item_id"], r["text"]): (r["label"], r["truthful"], r["relevant"], r["conflicting"])
            for r in sents.iter_rows(named=True)}


def test_labels_from_sentence_labels_and_the_fallback(tmp_path):
    """sentence_labels label units by exact text; unmatched and ambiguous texts get nulls; without them only the
    target sentence is relevant; `label` and the statements' truth stay as they were."""
    from flows.stages import STAGES
    from tasks.core.quality import validate_tables

    paths = RunPaths(tmp_path / "t")
    items = [
        {**_ITEM, "item_id": "cf", "question": "What is the capital of Italy?", "counterfactual": True,
         "context": "Paris is the capital of Italy. Rome is the capital of France. Berlin is in Germany. Oslo is cold.",
         "target_sentence": "Paris is the capital of Italy.",
         "sentence_labels": [_label("Paris is the capital of Italy.", False, True),  # the conflicting one
                             _label(" Rome is the capital of France.", False, False),  # false distractor
                             _label("Berlin is in Germany.", True, False),
                             _label("Madrid is in Peru.", False, True)]},  # not in the context: ignored
        {**_ITEM, "item_id": "al", "question": "Where is Bern?", "counterfactual": False,
         "context": "Bern is in Switzerland. Lima is in Peru. Quito is in Chile.",
         "target_sentence": "Bern is in Switzerland.",
         "sentence_labels": [_label("Bern is in Switzerland.", True, True), _label("Lima is in Peru.", None, False),
                             _label("Quito is in Chile.", False, True), _label("Quito is in Chile.", False, False)]},
        {**_ITEM, "item_id": "fb", "question": "Where is Oslo?", "counterfactual": True,
         "context": "Oslo is in Chile. Lima is in Peru. Oslo is cold.", "target_sentence": "Oslo is in Chile."},
    ]
    stmts = [("Oslo is in Chile.", 1), ("Lima is in Peru.", 0), ("Oslo is cold.", 0), ("Berlin is in Germany.", 1)]
    write_parquet(items, paths.table("items"), ITEMS)
    write_parquet([{"stmt_id": str(n), "key": text_key(t), "text": t, "label": y, "group": "s", "relation_id": None,
                    "split": "test"} for n, (t, y) in enumerate(stmts)], paths.table("statements"), STATEMENTS)
    run_decompose(RunConfig(run="t"), paths)
    assert _labels_of(paths) == {
        ("cf", "Paris is the capital of Italy."): ("conflict", False, True, True),
        ("cf", "Rome is the capital of France."): ("irrelevant", False, False, False),
        ("cf", "Berlin is in Germany."): ("irrelevant", True, False, False),  # the item's label beats the statement
        ("cf", "Oslo is cold."): ("irrelevant", True, None, None),  # no label: relevance unknown, truth as before
        ("al", "Bern is in Switzerland."): ("aligned", True, True, False),
        ("al", "Lima is in Peru."): ("irrelevant", True, False, False),  # label's truth unknown: the statement's
        ("al", "Quito is in Chile."): ("irrelevant", None, None, None),  # labelled two ways: unknown
        ("fb", "Oslo is in Chile."): ("conflict", False, True, True),  # no sentence_labels: the target is relevant
        ("fb", "Lima is in Peru."): ("irrelevant", True, None, None),
        ("fb", "Oslo is cold."): ("irrelevant", True, None, None),
    }
    assert validate_tables(STAGES["decompose"].suites, paths)["sentences"]["success"]


def test_conflict_label_consistency_is_checked(tmp_path):
    """The sentences suite fails a conflicting flag that relevant/truthful do not give, and a missing one."""
    from flows.stages import STAGES
    from tasks.core.quality import DataQualityError, validate_tables

    paths = RunPaths(tmp_path / "t")
    write_parquet([{**_ITEM, "item_id": "a", "question": "Q?", "counterfactual": True, "context": "A b. C d.",
                    "target_sentence": None}], paths.table("items"), ITEMS)
    good = {"item_id": "a", "sent_idx": 0, "key": text_key("A b."), "text": "A b.", "char_start": 0, "char_end": 4,
            "unit": "sentence", "source_idx": 0}
    cases = [((True, False, True), True), ((None, False, None), True), ((True, True, True), False),
             ((None, False, True), False), ((True, False, None), False), ((False, False, False), True)]
    for (relevant, truthful, conflicting), ok in cases:
        row = {**good, "relevant": relevant, "truthful": truthful, "conflicting": conflicting}
        write_parquet([row], paths.table("sentences"), SENTENCES)
        if ok:
            assert validate_tables(STAGES["decompose"].suites, paths)["sentences"]["success"]
        else:
            with pytest.raises(DataQualityError, match=r"conflict_consistent\] value_set=\[True\]: unexpected_count=1"):
                validate_tables(STAGES["decompose"].suites, paths)


def test_llm_facts_inherit_their_sentence_labels(server, tmp_path, monkeypatch):
    """An atomic fact takes the labels of its source sentence (source_idx); an unlabelled sentence's facts: null."""
    monkeypatch.setenv("CLEARFLOW_CACHE", str(tmp_path / "cache"))
    paths = RunPaths(tmp_path / "t")
    context = "Lyon is the capital of France and Lyon lies on the Thames. Hello there! Berlin is in Germany."
    item = {**_ITEM, "item_id": "a", "question": "What is the capital of France?", "context": context,
            "counterfactual": True, "target_sentence": "Lyon is the capital of France and Lyon lies on the Thames.",
            "sentence_labels": [_label("Lyon is the capital of France and Lyon lies on the Thames.", False, True),
                                _label("Hello there!", True, False)]}
    write_parquet([item], paths.table("items"), ITEMS)
    llm = {"backend": "openai", "base_url": server.base_url, "model": "test-model", "max_retries": 0}
    run_decompose(RunConfig.model_validate({"run": "t", "decompose": {"method": "llm", "llm": llm}}), paths)
    sents = read_table(paths.table("sentences"))
    got = [(r["text"], r["unit"], r["source_idx"], r["truthful"], r["relevant"], r["conflicting"])
           for r in sents.iter_rows(named=True)]
    assert got == [
        ("Lyon is the capital of France.", "fact", 0, False, True, True),
        ("Lyon lies on the Thames.", "fact", 0, False, True, True),
        ("Hello there!", "sentence", 1, True, False, False),
        ("Berlin is in Germany.", "fact", 2, None, None, None),  # its sentence has no label
    ]


def test_confiqa_substituted_sentences_are_conflicting(tmp_path):
    """ConFiQA: the changed answer-bearing sentence is relevant and false; unchanged ones are the original's true
    text of unknown relevance; another changed sentence and a record without orig_context get no guess."""
    from tasks.ingest.formats import READERS
    from tasks.ingest.formats.items import ReadOptions
    from tests import format_fixtures as F

    fact = F.FACTS[0]
    records = [F.confiqa_record(f) for f in F.FACTS[:3]]
    records[1]["cf_context"] += " Canberra was renamed."  # changed, without the answer
    del records[2]["orig_context"]
    path = tmp_path / "ConFiQA-QA.json"
    path.write_text(__import__("json").dumps(records))
    out = READERS["confiqa-qa"].read(path, ReadOptions())
    paths = RunPaths(tmp_path / "t")
    write_parquet(out.items, paths.table("items"), ITEMS)
    run_decompose(RunConfig(run="t"), paths)
    got = {text: labels for (_, text), labels in _labels_of(paths).items()}
    intro, outro = fact[4], fact[5]
    assert got[intro] == ("irrelevant", True, None, None) and got[outro] == ("irrelevant", True, None, None)
    assert got[F.target_of(fact)] == ("conflict", False, True, True)
    assert got[F.target_of(F.FACTS[1])] == ("conflict", False, True, True)
    assert got["Canberra was renamed."] == ("irrelevant", None, None, None)
    # no orig_context: nothing says the answer sentence changed; it is the target, so relevant, truth unknown
    assert got[F.target_of(F.FACTS[2])] == ("conflict", None, True, None)
    assert got[F.FACTS[2][4]] == ("irrelevant", None, None, None)
