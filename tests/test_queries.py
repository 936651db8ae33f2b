"""The README's example DuckDB queries (tasks.catalog.queries) answer what they claim, on a store built to know the answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from schemas import tables as T
from tasks.catalog.views import ReadOnlyQueryError, query
from tasks.catalog.queries import EXAMPLES, README_PARAMS, example_sql
from tasks.core.storage import RunPaths, text_key, write_json, write_parquet

README = Path(__file__).resolve().parents[1] / "README.md"
TARGET = README_PARAMS["nearest_statements"]["sentence"]  # the README's sentence is planted in the store
LAYER = README_PARAMS["nearest_statements"]["layer"]
LAYERS = [0, LAYER]
# (text, label, vector at LAYER): conflicting statements near +e1, the aligned ones their exact negatives,
# so the mean vectors are exactly opposite (separation 2); at layer 0 every vector is the same (separation 0).
STATEMENTS = [
    ("The official language of Chiasso is Bulgarian.", 1, [1.0, 0.2, 0.0, 0.0]),
    ("The official language of Kenya is Ukrainian.", 1, [1.0, -0.2, 0.0, 0.0]),
    ("The official language of Argentina is Ukrainian.", 1, [1.0, 0.0, 0.3, 0.0]),
    ("The official language of Bulgaria is Bulgarian.", 0, [-1.0, -0.2, 0.0, 0.0]),
    ("The official language of Finland is Finnish.", 0, [-1.0, 0.2, 0.0, 0.0]),
    ("The official language of Kenya is English.", 0, [-1.0, 0.0, -0.3, 0.0]),
]
SAME = [0.5, 0.5, 0.5, 0.5]
# item -> (question, [(sentence text, vector at LAYER or None if it is a statement)])
ITEMS = {
    "it-1": ("What is the official language of Helsinki?",
             [(TARGET, [0.9, 0.3, 0.0, 0.0]),
              ("The official language of Finland is Finnish.", None)]),
    "it-2": ("What is the official language of Chiasso?",
             [("The official language of Chiasso is Bulgarian.", None),
              ("Chiasso lies in Ticino.", [0.0, 0.0, 0.0, 1.0])]),
}  # fmt: skip
# run -> {(item_id, sent_idx): (p_conflict, flagged)}: the two runs disagree on the top sentence
SCORES = {
    "new": {("it-1", 0): (0.91, True), ("it-1", 1): (0.10, False),
            ("it-2", 0): (0.97, True), ("it-2", 1): (0.45, False)},
    "old": {("it-1", 0): (0.80, True), ("it-1", 1): (0.20, False),
            ("it-2", 0): (0.70, True), ("it-2", 1): (0.65, True)},
}  # fmt: skip


def _activation_rows() -> list[tuple[str, str, str, str | None, list[float], list[float]]]:
    """(key, source, position, context_key, vector at LAYER, vector at 0) of every stored vector.

    Statements, then sentences no statement shares a key with (as the activations stage stores them), each fed
    alone ('last'); then every sentence read in its context ('ctx_last'), with vectors that would change every
    answer if a query forgot to keep position = 'last'.
    """
    rows = [(text_key(t), "statements", "last", None, v, SAME) for t, _, v in STATEMENTS]
    rows += [(text_key(t), "sentences", "last", None, v, SAME)
             for _, sents in ITEMS.values() for t, v in sents if v is not None]  # fmt: skip
    for _, sents in ITEMS.values():
        context = text_key(" ".join(t for t, _ in sents))
        source = {t: "statements" if v is None else "sentences" for t, v in sents}
        rows += [(text_key(t), source[t], "ctx_last", context, [-1.0, -1.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4])
                 for t, _ in sents]  # fmt: skip
    return rows


def _write_activations(paths: RunPaths, value_type: pa.DataType) -> None:
    """One shard per layer of the rows above, vectors stored as value_type."""
    rows = _activation_rows()
    for layer in LAYERS:
        vectors = np.array([r[4] if layer == LAYER else r[5] for r in rows], dtype=value_type.to_pandas_dtype())
        flat = pa.array(vectors.reshape(-1), value_type)
        columns = {name: [r[i] for r in rows] for i, name in enumerate(("key", "source", "position", "context_key"))}
        columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, 4)
        out = paths.activations / "model=tiny" / f"layer={layer}" / "part-00000.parquet"
        write_parquet(pa.table(columns), out, T.activations_schema(4, value_type))


def _write_run(runs_dir: Path, name: str, finished_at: str, value_type: pa.DataType) -> None:
    """A run with items, statements, sentences, sentence scores and an activation store."""
    paths = RunPaths(runs_dir / name)
    items = [{"item_id": i, "dataset": "toy", "split": "test", "group": i, "question": q,
              "context": " ".join(t for t, _ in sents), "answers": ["x"], "counterfactual": True}
             for i, (q, sents) in ITEMS.items()]  # fmt: skip
    statements = [{"stmt_id": f"s{n}", "key": text_key(t), "text": t, "label": lab, "group": str(n), "split": "train"}
                  for n, (t, lab, _) in enumerate(STATEMENTS)]  # fmt: skip
    sentences = [{"item_id": i, "sent_idx": n, "key": text_key(t), "text": t, "char_start": 0, "char_end": len(t)}
                 for i, (_, sents) in ITEMS.items() for n, (t, _) in enumerate(sents)]  # fmt: skip
    scores = [{"item_id": i, "sent_idx": n, "key": text_key(ITEMS[i][1][n][0]), "layer": LAYER, "probe": "logistic",
               "p_conflict": p, "flagged": f} for (i, n), (p, f) in SCORES[name].items()]  # fmt: skip
    for table, rows in (("items", items), ("statements", statements), ("sentences", sentences),
                        ("sentence_scores", scores)):  # fmt: skip
        write_parquet(rows, paths.table(table), T.TABLES[table])
    _write_activations(paths, value_type)
    write_json({"run": name, "finished_at": finished_at}, paths.manifest)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """Two runs: 'new' (latest, float32 vectors) and 'old' (float16 vectors, which DuckDB reads as FLOAT[])."""
    runs = tmp_path_factory.mktemp("q") / "runs"
    _write_run(runs, "old", "2026-01-01T10:00:00+00:00", pa.float16())
    _write_run(runs, "new", "2026-01-02T10:00:00+00:00", pa.float32())
    return runs


def _readme_sql(name: str) -> str:
    """The example exactly as the README shows it."""
    return example_sql(name, **README_PARAMS.get(name, {}))


def _cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("run", [None, "old"])
def test_layer_separation_is_zero_where_identical_and_two_where_opposite(runs_dir, run):
    cols, rows = query(_readme_sql("layer_separation"), runs_dir, run=run)
    assert cols == ["model", "layer", "separation"]
    assert [(m, la) for m, la, _ in rows] == [("tiny", 0), ("tiny", LAYER)]
    assert rows[0][2] == pytest.approx(0.0, abs=1e-6)
    assert rows[1][2] == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("run", [None, "old"])
def test_nearest_statements_rank_by_cosine_to_the_sentence(runs_dir, run):
    """The planted statement comes first; the rest follow numpy's cosine ranking; the 6th is cut."""
    cols, rows = query(_readme_sql("nearest_statements"), runs_dir, run=run)
    assert cols == ["text", "label", "cosine"]
    target = ITEMS["it-1"][1][0][1]
    expected = sorted(((t, lab, _cosine(v, target)) for t, lab, v in STATEMENTS), key=lambda r: -r[2])[:5]
    assert rows[0][:2] == ("The official language of Chiasso is Bulgarian.", 1)
    assert [r[:2] for r in rows] == [r[:2] for r in expected]
    tol = 1e-6 if run is None else 2e-3  # float16 storage rounds 0.2 and 0.3
    assert [r[2] for r in rows] == pytest.approx([r[2] for r in expected], abs=tol)


def test_nearest_statements_by_key_and_layer(runs_dir):
    """A sentence given by its key works; one that is itself a statement finds itself first (cosine 1)."""
    finnish = "The official language of Finland is Finnish."
    _, rows = query(example_sql("nearest_statements", sentence=text_key(finnish), layer=LAYER), runs_dir)
    assert rows[0] == (finnish, 0, pytest.approx(1.0, abs=1e-6))
    _, rows = query(example_sql("nearest_statements", sentence=text_key(finnish), layer=0), runs_dir)
    assert len(rows) == 5 and all(r[2] == pytest.approx(1.0, abs=1e-6) for r in rows)  # layer 0: all identical
    _, rows = query(example_sql("nearest_statements", sentence=TARGET, layer=7), runs_dir)
    assert rows == []  # no such layer in the store


def test_top_flagged_sentences_with_their_questions(runs_dir):
    cols, rows = query(_readme_sql("top_flagged"), runs_dir)
    assert cols == ["item_id", "question", "sentence", "p_conflict"]
    assert rows == [
        ("it-2", "What is the official language of Chiasso?", "The official language of Chiasso is Bulgarian.", 0.97),
        ("it-1", "What is the official language of Helsinki?", TARGET, 0.91),
    ]  # unflagged sentences (0.45, 0.10) are left out
    _, rows = query(_readme_sql("top_flagged"), runs_dir, run="old")
    assert [(r[0], r[3]) for r in rows] == [("it-1", 0.80), ("it-2", 0.70), ("it-2", 0.65)]


def test_parameters_are_inlined_as_literals(runs_dir):
    """A quote in a parameter cannot change the query; missing, unknown or odd parameters fail by name."""
    sql = example_sql("nearest_statements", sentence="x' OR true OR '", layer=LAYER)
    assert "'x'' OR true OR '''" in sql
    assert query(sql, runs_dir)[1] == []
    with pytest.raises(ValueError, match=r"takes parameters \['layer', 'sentence'\], got \['sentence'\]"):
        example_sql("nearest_statements", sentence=TARGET)
    with pytest.raises(TypeError, match="expected str, int or float"):
        example_sql("nearest_statements", sentence=TARGET, layer=[LAYER])
    with pytest.raises(KeyError, match="no example query 'nope'"):
        example_sql("nope")


def test_writing_an_example_out_is_refused(runs_dir):
    """Exporting an example's answer (COPY ... TO) goes through the read-only check and writes nothing."""
    out = runs_dir / "new" / "flagged.csv"
    with pytest.raises(ReadOnlyQueryError, match="clearflow sql is read-only: COPY statements are refused"):
        query(f"COPY ({_readme_sql('top_flagged')}) TO '{out}'", runs_dir)
    assert not out.exists()


def test_readme_shows_every_example_as_tested():
    """The README's "Querying with DuckDB" section holds each example verbatim, so what it shows is what runs here."""
    text = README.read_text()
    section = text[text.index("### Querying with DuckDB") :]
    section = section[: section.index("\n## ")]
    for name in EXAMPLES:
        assert _readme_sql(name) in section, f"README lacks the {name} example as tasks/catalog/queries.py renders it"
    assert "tests/test_queries.py" in section


def test_examples_run_by_name_from_the_cli(runs_dir, capsys):
    """`clearflow sql --example NAME --param k=v` prints what the query returns; misuse is one clear error."""
    from flows.cli import main

    main(["sql", "--example", "nearest_statements", "--param", f"layer={LAYER}",
          "--param", "sentence=The official language of Finland is Finnish.", "--runs-dir", str(runs_dir)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["text", "label", "cosine"]
    assert out[2].startswith("The official language of Finland is Finnish.")  # itself first, cosine 1
    for bad, message in ((["--example", "top_flagged", "select 1"], "either a SQL query or --example"),
                         (["--example", "nope"], "no example query 'nope'"),
                         (["--example", "nearest_statements", "--param", "layer"], "expected NAME=VALUE")):
        with pytest.raises(SystemExit):
            main(["sql", *bad, "--runs-dir", str(runs_dir)])
        assert message in capsys.readouterr().err


def test_template_overlap_finds_exactly_the_test_items_sharing_a_train_wording_pair(tmp_path):
    """A test item with a train item's (question, sentence) wording pair is listed; other pairs are not."""
    runs = tmp_path / "runs"
    paths = RunPaths(runs / "r")
    rows = [("tr-1", "train", "P36:q0", "P36:s0"), ("tr-2", "train", "P17:q1", None),
            ("te-1", "test", "P36:q0", "P36:s0"),  # the same pair as tr-1: leaked
            ("te-2", "test", "P36:q0", "P36:s2"),  # same question wording, another sentence wording
            ("te-3", "test", "P17:q1", None),  # irrelevant-condition item: no sentence wording, like tr-2
            ("te-4", "test", None, None)]  # no generated wording at all (a published dataset)
    items = [{"item_id": i, "dataset": "toy", "split": s, "group": i, "question": "Q?", "context": "C.",
              "answers": ["x"], "counterfactual": True, "question_template": q, "sentence_template": st}
             for i, s, q, st in rows]
    write_parquet(items, paths.table("items"), T.ITEMS)
    write_json({"run": "r", "finished_at": "2026-01-03T10:00:00+00:00"}, paths.manifest)
    _, found = query(_readme_sql("template_overlap"), runs, run="r")
    assert [r[0] for r in found] == ["te-1", "te-3"]


def test_paired_verdicts_say_what_the_report_says(tmp_path):
    """A run where CLEAR gives the context answer on all 6 items and full context on none, and probe marking answers
    exactly like full context: CLEAR is higher by 100 points (McNemar p = 2 / 2^6), its MR lower by 100; probe
    marking shows no measurable effect anywhere; the reference `sft` was not evaluated, so it has no rows."""
    import polars as pl

    from tasks.evaluate.paired import comparisons

    runs = tmp_path / "runs"
    paths = RunPaths(runs / "r")
    ids = [f"q{k}" for k in range(6)]
    items = pl.DataFrame({"item_id": ids, "counterfactual": [True] * 6})
    predictions = pl.concat([
        pl.DataFrame({"method": m, "item_id": ids, "em": [float(right)] * 6, "f1": [float(right)] * 6,
                      "ps": [right] * 6, "po": [not right] * 6})
        for m, right in (("full_context", False), ("probe_marking", False), ("clear", True))
    ])
    write_parquet(comparisons(predictions, items, ["full_context", "sft"], 200, 0), paths.table("comparisons"),
                  T.COMPARISONS)
    write_json({"run": "r", "finished_at": "2026-01-04T10:00:00+00:00"}, paths.manifest)
    cols, rows = query(_readme_sql("paired_verdicts"), runs, run="r")
    assert cols == ["reference", "method", "metric", "n", "diff_points", "lo", "hi", "p_mcnemar", "verdict"]
    tested = {"em", "ps"}
    expected = [("full_context", "clear", m, 6, sign * 100.0, sign * 100.0, sign * 100.0,
                 "higher" if sign > 0 else "lower") for m, sign in (("em", 1), ("f1", 1), ("mr", -1), ("ps", 1))]
    expected += [("full_context", "probe_marking", m, 6, 0.0, 0.0, 0.0, "no measurable effect")
                 for m in ("em", "f1", "mr", "ps")]
    assert [(*r[:7], r[8]) for r in rows] == expected
    assert [r[7] for r in rows] == [pytest.approx(2 / 64) if r[2] in tested and r[1] == "clear"
                                    else (1.0 if r[2] in tested else None) for r in rows]
