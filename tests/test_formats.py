"""Benchmark readers: every published format loads with the right values, nothing is lost, non-formats stop."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from schemas.tables import ITEMS, REJECTS, STATEMENTS
from tasks.core.config import RunConfig
from schemas import rejects as R
from tasks.ingest.formats import MODULES, READERS, FormatError, Ingested, ReadOptions, registry
from tasks.ingest.formats.known_facts_options import KnownFactsOptions
from tasks.ingest.formats.items import fit_context, target_sentence
from tasks.ingest.formats.records import _decode, flatten_squad
from tasks.ingest.formats.faitheval import CONFLICT_INSTRUCTION, UNKNOWN_INSTRUCTION
from tasks.ingest.provenance import loader_code_files
from tasks.ingest.stage import ingest
from tasks.core.storage import text_key, to_arrow
from tests import format_fixtures as F

# known-facts v1 on the small fixtures (v2 needs more facts per split: tests/test_known_facts_v2.py)
V1 = KnownFactsOptions(version="1")
WORDS = ReadOptions(max_context_tokens=F.LONG_BUDGET, count_tokens=lambda t: len(t.split()), known_facts=V1)
QA_REASONS = {
    R.MISSING_FIELD, R.WRONG_TYPE, R.EMPTY_QUESTION, R.EMPTY_CONTEXT, R.EMPTY_ANSWERS, R.DUPLICATE_ID,
    R.UNDECODABLE, R.CONTEXT_TOO_LONG, R.SAME_ANSWER, R.NOT_AN_OBJECT, R.MALFORMED_JSON, R.MISALIGNED,
}
F_ZHOU = ("orig_dev_filtered.json", "conflict_dev_filtered.json")
KF_REASONS = {R.EMPTY_FIELD, R.UNKNOWN_RELATION, R.DUPLICATE, R.NO_COUNTERFACTUAL, R.UNFORMABLE_SENTENCE}


def _read(name: str, tmp_path: Path, broken: bool = False, opts: ReadOptions = WORDS, **kw) -> Ingested:
    return READERS[name].read(F.WRITERS[name](tmp_path, broken=broken, **kw), opts)


def _by_question(out: Ingested) -> dict[str, dict]:
    return {it["question"]: it for it in out.items}


def _check_tables(out: Ingested) -> None:
    """Rows fit their schemas exactly, ids are unique and no group straddles splits."""
    assert all(set(it) == set(ITEMS.names) for it in out.items)
    for rows, schema in ((out.items, ITEMS), (out.statements, STATEMENTS), (out.rejects, REJECTS)):
        assert to_arrow(rows, schema).num_rows == len(rows)
    assert len({it["item_id"] for it in out.items}) == len(out.items)
    assert len({s["stmt_id"] for s in out.statements}) == len(out.statements)
    split_of: dict[str, set] = {}
    for row in (*out.items, *out.statements):
        split_of.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values())


def test_registry_names_and_metadata():
    assert set(READERS) == {
        "known-facts", "confiqa-qa", "confiqa-mr", "confiqa-mc", "faitheval-counterfactual",
        "faitheval-unanswerable", "faitheval-inconsistent", "nq-swap", "zhou-nq", "squad", "mquake",
    }
    for name, reader in READERS.items():
        assert reader.name == name and reader.version and reader.summary and reader.source
        assert reader.needs_path == (name != "known-facts")
    with pytest.raises(ValueError, match="needs --data-path"):
        READERS["squad"].read(None, ReadOptions())


@pytest.mark.parametrize("name", sorted(F.WRITERS))
def test_good_fixture_loads_whole(name, tmp_path):
    out = _read(name, tmp_path)
    n_records = 7 if name == "mquake" else 9 if name == "known-facts" else 8
    assert out.n_read == out.n_kept == n_records and not out.rejects
    _check_tables(out)
    assert {it["split"] for it in out.items} == {"train", "dev", "test"}
    assert all(it["dataset"] == name and it["item_id"].startswith(("kf-", f"{name}-")) for it in out.items)
    assert all(it["truncated"] is False for it in out.items)


@pytest.mark.parametrize("kind", ["qa", "mr", "mc"])
def test_confiqa_values(kind, tmp_path):
    items = _by_question(_read(f"confiqa-{kind}", tmp_path))
    fact = F.FACTS[0]
    it = items[fact[0]]
    assert it["context"] == F.context_of(fact, "Charlotte Bronte")
    assert it["orig_context"] == F.context_of(fact, "George Eliot")
    assert it["answers"] == ["Charlotte Bronte", "Currer Bell"]
    assert it["orig_answers"] == ["George Eliot", "Mary Ann Evans"]
    assert it["target_sentence"] == "The novel was written by Charlotte Bronte."
    assert it["counterfactual"] is True and it["source_id"] is None and it["choices"] is None
    assert it["group"] == "who wrote novel middlemarch"
    assert items["Which element has the chemical symbol Fe?"]["answers"] == ["Copper", "Cu metal"]


def test_faitheval_counterfactual_values(tmp_path):
    out = _read("faitheval-counterfactual", tmp_path)
    by_id = {it["source_id"]: it for it in out.items}
    it = by_id["fe-cf-0"]
    assert it["item_id"] == "faitheval-counterfactual-fe-cf-0"
    assert it["choices"] == ["A. George Eliot", "B. Charlotte Bronte", "C. None of the above", "D. Unknown entity"]
    assert it["answers"] == ["Charlotte Bronte"] and it["orig_answers"] is None and it["counterfactual"] is True
    assert it["target_sentence"] == "The novel was written by Charlotte Bronte."
    assert by_id["fe-cf-1"]["answers"] == ["Melbourne"]  # `answer` given as the label "B"
    assert by_id["fe-cf-2"]["answers"] == ["Copper"]  # only answerKey


@pytest.mark.parametrize(
    ("subset", "answer", "instruction"),
    [("unanswerable", "unknown", UNKNOWN_INSTRUCTION), ("inconsistent", "conflict", CONFLICT_INSTRUCTION)],
)
def test_faitheval_expected_word_values(subset, answer, instruction, tmp_path):
    out = _read(f"faitheval-{subset}", tmp_path)
    it = {i["source_id"]: i for i in out.items}[f"fe-{subset[:2]}-4"]
    assert it["answers"] == [answer] and f'"{answer}"' in it["instruction"] and it["instruction"] == instruction
    assert it["orig_answers"] == ["Leonardo da Vinci", "Leonardo"]
    assert it["counterfactual"] is False and it["target_sentence"] is None and it["choices"] is None
    assert it["question"] == "Who painted the Mona Lisa?"


def test_nq_swap_values(tmp_path):
    it = _by_question(_read("nq-swap", tmp_path))["Who painted the Mona Lisa?"]
    assert it["answers"] == ["Raphael", "Raffaello Sanzio"] and it["orig_answers"] == ["Leonardo da Vinci", "Leonardo"]
    assert it["context"] == F.context_of(F.FACTS[4], "Raphael")
    assert it["orig_context"] == F.context_of(F.FACTS[4], "Leonardo da Vinci")
    assert it["target_sentence"] == "The Mona Lisa was painted by Raphael." and it["counterfactual"] is True


def test_zhou_pair_values_and_paths(tmp_path):
    root = F.write_zhou_nq(tmp_path)
    reader = READERS["zhou-nq"]
    orig, conflict = root / "orig_dev_filtered.json", root / "conflict_dev_filtered.json"
    assert reader.files(root) == reader.files(orig) == reader.files(conflict) == [orig, conflict]
    outs = [reader.read(p, ReadOptions()) for p in (root, orig, conflict)]
    assert outs[0].items == outs[1].items == outs[2].items
    items = _by_question(outs[0])
    it = items["Who painted the Mona Lisa?"]  # position 4: answers as strings
    assert it["answers"] == ["Raphael"] and it["orig_answers"] == ["Leonardo da Vinci"]
    assert it["context"] == F.context_of(F.FACTS[4], "Raphael")
    assert it["orig_context"] == F.context_of(F.FACTS[4], "Leonardo da Vinci")
    it = items["Who developed the theory of general relativity?"]  # position 7: answers as lists
    assert it["answers"] == ["Niels Bohr", "Bohr"] and it["orig_answers"] == ["Albert Einstein", "Einstein"]
    (root / "conflict_dev_filtered.json").unlink()
    with pytest.raises(FileNotFoundError, match="conflict_dev_filtered.json"):
        reader.read(orig, ReadOptions())


@pytest.mark.parametrize("layout", ["nested", "hf", "strings"])
def test_squad_layouts(layout, tmp_path):
    out = _read("squad", tmp_path, layout=layout)
    assert out.n_kept == 8
    it = _by_question(out)["Who wrote the novel Middlemarch?"]
    expected = ["George Eliot"] if layout == "nested" else ["George Eliot", "Mary Ann Evans"]
    assert it["answers"] == expected and it["orig_answers"] is None and it["counterfactual"] is False
    assert it["source_id"] == ("sq-0-0" if layout == "nested" else "sq-hf-0")
    assert it["item_id"] == f"squad-{it['source_id']}"
    assert it["context"] == F.context_of(F.FACTS[0], "George Eliot")
    assert it["target_sentence"] == "The novel was written by George Eliot."


def test_mquake_statements_and_items(tmp_path):
    out = _read("mquake", tmp_path)
    assert len(out.statements) == 16 and len(out.items) == 6 and out.n_kept == 7
    text_label = {s["text"]: (s["label"], s["group"]) for s in out.statements}
    assert text_label["Ellie Kemper is a citizen of United States of America"] == (0, "Ellie Kemper")
    assert text_label["Ellie Kemper is a citizen of Croatia"] == (1, "Ellie Kemper")
    assert text_label["The native language of Thomas Joannes Stieltjes is German"] == (1, "Thomas Joannes Stieltjes")
    assert all(s["key"] == text_key(s["text"]) for s in out.statements)
    it = {i["source_id"]: i for i in out.items}["1"]
    assert it["item_id"] == "mquake-1" and it["group"] == "Ellie Kemper"
    assert it["question"] == "What is the capital of the country of citizenship of Ellie Kemper?"
    assert it["context"] == "Ellie Kemper is a citizen of Croatia. The capital of Croatia is Split."
    assert it["answers"] == ["Split", "Spalato"] and it["orig_answers"] == ["Washington, D.C.", "Washington"]
    assert it["target_sentence"] == "The capital of Croatia is Split." and it["counterfactual"] is True
    assert "8" not in {i["source_id"] for i in out.items}  # the record without questions: statements only


def test_known_facts_reader_small_file(tmp_path):
    out = _read("known-facts", tmp_path)
    assert len(out.statements) == 18 and all(it["source_id"] == it["item_id"][3:] for it in out.items)
    assert all(it["target_sentence"] in it["context"] for it in out.items)


def _source_records(path: Path) -> list:
    """The records of a fixture file as a reader numbers them (for checking rejects.raw)."""
    if path.is_dir():
        orig, conflict = (json.loads(_decode((path / n).read_bytes())) for n in F_ZHOU)
        n = max(len(orig), len(conflict))
        return [{"orig": orig[i] if i < len(orig) else None, "conflict": conflict[i] if i < len(conflict) else None}
                for i in range(n)]
    text = _decode(path.read_bytes())
    if path.suffix == ".jsonl":
        out = []
        for line in filter(str.strip, text.splitlines()):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(line)
        return out
    doc = json.loads(text)
    return flatten_squad(doc) if isinstance(doc, dict) else doc


def test_broken_fixtures_reject_every_reason_and_lose_nothing(tmp_path):
    seen: Counter = Counter()
    for name, write in F.WRITERS.items():
        (tmp_path / name).mkdir()
        path = write(tmp_path / name, broken=True)
        out = READERS[name].read(path, WORDS)
        assert out.n_read == out.n_kept + len(out.rejects), name
        assert out.n_kept >= 7 and {it["split"] for it in out.items} == {"train", "dev", "test"}, name
        _check_tables(out)
        records = _source_records(path)
        assert out.n_read == len(records), name
        assert len({r["record"] for r in out.rejects}) == len(out.rejects)
        for r in out.rejects:
            assert json.loads(r["raw"]) == records[r["record"]], (name, r)
            assert r["source"] in (path.name, "conflict_dev_filtered.json") and r["detail"]
        reasons = Counter(r["reason"] for r in out.rejects)
        assert reasons == Counter(F.BROKEN_REASONS[name]), name
        seen.update(reasons)
    assert set(seen) == QA_REASONS | KF_REASONS
    assert set(seen) <= set(R.REASONS)


def test_record_ids_of_rejects(tmp_path):
    out = _read("faitheval-counterfactual", tmp_path, broken=True)
    reasons = {r["record_id"]: r["reason"] for r in out.rejects}
    assert reasons["faitheval-counterfactual-fe-cf-x1"] == R.EMPTY_ANSWERS
    assert reasons["faitheval-counterfactual-fe-cf-0"] == R.DUPLICATE_ID


@pytest.mark.parametrize("name", sorted(READERS))
def test_not_the_format_stops_with_one_line_naming_the_file(name, tmp_path):
    path = F.write_not_the_format(tmp_path)
    with pytest.raises(FormatError) as err:
        READERS[name].read(path, ReadOptions())
    message = str(err.value)
    assert str(path) in message and name in message and "\n" not in message and "expected" in message


@pytest.mark.parametrize(
    ("file_name", "content", "found"),
    [
        ("obj.json", json.dumps({"rows": []}), "JSON object"),
        ("other.json", json.dumps([{"title": "x", "text": "y"}] * 3), r"fields \['text', 'title'\]"),
        ("empty.json", "[]", "no records"),
        ("lines.jsonl", "not json\nstill not\n", "no line"),
        ("data.parquet", "PAR1 these bytes are not parquet", "unreadable"),
        ("data.csv", "a,b\n", "extension"),
    ],
)
def test_other_non_formats(file_name, content, found, tmp_path):
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(FormatError, match=found) as err:
        READERS["confiqa-qa"].read(path, ReadOptions())
    assert str(path) in str(err.value)


def test_required_fields_named_in_format_error(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"title": "x"}]))
    with pytest.raises(FormatError, match="question, cf_context, cf_answer, orig_answer"):
        READERS["confiqa-qa"].read(path, ReadOptions())


def test_jsonl_under_a_json_name_is_read(tmp_path):
    rows = [F.confiqa_record(f) for f in F.FACTS]
    path = tmp_path / "ConFiQA-QA.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert READERS["confiqa-qa"].read(path, ReadOptions()).n_kept == 8


def test_default_benchmark_round_trips_through_confiqa(tmp_path):
    kf = ingest(RunConfig(run="t", ingest={"known_facts_version": "1"}))  # v1: every item counterfactual
    records = [
        {"question": it["question"], "cf_context": it["context"], "cf_answer": it["answers"][0], "cf_alias": [],
         "orig_answer": it["orig_answers"][0], "orig_alias": [], "orig_context": it["orig_context"],
         "cf_triple": "()", "orig_triple": "()"}
        for it in kf.items
    ]
    path = tmp_path / "ConFiQA-QA.json"
    path.write_text(json.dumps(records))
    out = READERS["confiqa-qa"].read(path, ReadOptions())
    assert out.n_kept == len(kf.items) and not out.rejects
    key = lambda it: (it["question"], it["context"], tuple(it["answers"]), it["orig_context"])  # noqa: E731
    assert sorted(map(key, out.items)) == sorted(map(key, kf.items))
    target = {it["question"]: it["target_sentence"] for it in kf.items}
    assert all(it["target_sentence"] == target[it["question"]] for it in out.items)


def _long_record() -> dict:
    sentences = [f"Sentence {i} has exactly six words." for i in range(10)]  # 6 words each
    sentences[1] = "The novel was written by Charlotte Bronte."  # 7 words
    return {**F.confiqa_record(F.FACTS[0]), "cf_context": " ".join(sentences)}


@pytest.mark.parametrize("policy", ["reject", "truncate"])
def test_truncation_policy(policy, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([_long_record()]))
    count = lambda t: len(t.split())  # noqa: E731
    out = READERS["confiqa-qa"].read(path, ReadOptions(max_context_tokens=19, truncation=policy, count_tokens=count))
    if policy == "reject":
        assert not out.items and out.rejects[0]["reason"] == R.CONTEXT_TOO_LONG
        assert "61 tokens, over the budget of 19" in out.rejects[0]["detail"]
        return
    (it,) = out.items
    assert it["truncated"] is True and count(it["context"]) == 19  # 6 + 7 + 6: three whole sentences, exactly
    assert _long_record()["cf_context"].startswith(it["context"]) and it["context"].endswith("six words.")
    assert it["target_sentence"] == "The novel was written by Charlotte Bronte."
    tight = ReadOptions(max_context_tokens=5, truncation="truncate", count_tokens=count)
    out = READERS["confiqa-qa"].read(path, tight)  # not even the first sentence fits
    assert not out.items and out.rejects[0]["reason"] == R.CONTEXT_TOO_LONG


def test_truncation_option_is_checked():
    with pytest.raises(ValueError, match="truncation"):
        ReadOptions(truncation="cut")


def test_limit_sampling_is_seeded_and_counts_add_up(tmp_path):
    path = F.write_confiqa_qa(tmp_path, broken=True)
    reader = READERS["confiqa-qa"]
    runs = {seed: reader.read(path, ReadOptions(seed=seed, limit=10)) for seed in (0, 0, 1, 2)}
    again = reader.read(path, ReadOptions(seed=0, limit=10))
    assert again.items == runs[0].items and again.rejects == runs[0].rejects
    chosen = {}
    for seed, out in runs.items():
        assert out.n_read == 10 and out.n_kept + len(out.rejects) == 10
        assert "limit: 10 of 18 records sampled with seed" in out.summary()
        chosen[seed] = {it["question"] for it in out.items} | {r["record"] for r in out.rejects}
    assert chosen[0] != chosen[1] or chosen[0] != chosen[2]
    assert reader.read(path, ReadOptions(limit=100)).n_read == 18


def test_target_sentence_and_fit_helpers():
    ctx = "Paris is big. The Eiffel Tower stands in Lyon. Lyon is old."
    assert target_sentence(ctx, ["lyon"]) == "The Eiffel Tower stands in Lyon."
    assert target_sentence(ctx, ["Rome"]) is None
    assert fit_context(ctx, ReadOptions()) == (ctx, False)  # no counter: no budget check


def test_jsonl_line_level_rejects(tmp_path):
    good = json.dumps(F.confiqa_record(F.FACTS[0])).encode()
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join([good, b'{"question": "\xff', b"{broken", b"", b"[1]"]) + b"\n")
    out = READERS["confiqa-qa"].read(path, ReadOptions())
    assert out.n_read == 4 and out.n_kept == 1  # the blank line is no record
    assert [r["reason"] for r in out.rejects] == [R.UNDECODABLE, R.MALFORMED_JSON, R.NOT_AN_OBJECT]
    assert json.loads(out.rejects[0]["raw"]) == '{"question": "\udcff' and "line 2" in out.rejects[0]["detail"]
    to_arrow(out.rejects, REJECTS)  # the lone surrogate is escaped, so the table still writes


# ------------------------------------------------------------------- one new dataset = one parse function


def test_a_new_reader_is_a_parse_function_and_its_options(tmp_path, monkeypatch):
    finished = []
    reader = F.toy_reader(finish=finished.append)
    monkeypatch.setitem(READERS, F.TOY, reader)
    path = F.write_toy(tmp_path, broken=True)
    out = ingest(RunConfig(run="t", dataset=F.TOY, data_path=path, ingest={"max_context_tokens": 400}))
    assert len(out.items) == 8 and {it["dataset"] for it in out.items} == {F.TOY}
    assert {it["split"] for it in out.items} == {"train", "dev", "test"}
    assert out.items[0]["target_sentence"] == F.target_of(F.FACTS[0])
    assert [r["reason"] for r in out.rejects] == [R.SAME_ANSWER, R.NOT_AN_OBJECT] and len(finished) == 1
    assert out.statements and all(s["stmt_id"].startswith("kf-") for s in out.statements)  # bundled known facts
    assert reader.files(path) == [path]
    with pytest.raises(ValueError, match=f"'{F.TOY}' needs --data-path \\(get the file from tests/"):
        reader.read(None, ReadOptions())
    path.write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(FormatError, match="records with fields q, passage"):
        reader.read(path, ReadOptions())


def test_registry_lists_every_module_once_and_refuses_a_name_twice():
    assert list(registry(MODULES)) == list(READERS)
    with pytest.raises(ValueError, match="'squad' is registered twice"):
        registry([*MODULES, "squad"])


def test_readers_build_on_shared_contracts_only():
    """Readers import neither evaluation nor scoring: only schemas/, tasks/core/ and the formats package."""
    root = Path(__file__).resolve().parents[1]
    files = {f.relative_to(root).as_posix() for f in loader_code_files()}
    allowed = ("schemas/", "tasks/core/", "tasks/ingest/formats/")
    assert all(f.startswith(allowed) for f in files), sorted(files)
    shared = {"schemas/tables.py", "schemas/rejects.py", "tasks/core/text.py", "tasks/core/splitter.py"}
    assert shared <= files and {f"tasks/ingest/formats/{m}.py" for m in MODULES} <= files
