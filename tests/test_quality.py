"""Great Expectations suites: a well-formed run passes every table; each kind of breakage is named."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import tables as T
from flows.stages import STAGES
from tasks.core.quality import DataQualityError, validate, validate_tables
from tasks.core.storage import RunPaths, text_key, write_json, write_parquet

CONTEXTS = {
    "i1": "Paris is the capital of Italy. It lies on the Seine.",
    "i2": "Zoë Müller was born in Tōkyō. She moved to Berlin.",  # non-ASCII: offsets are characters
    "i3": "The Nile flows north. It ends in the sea.",
}
SPLIT_OF = {"i1": "train", "i2": "dev", "i3": "test"}
DIM = 8
LAYERS = [0, 2]


def _sentences() -> list[dict]:
    """Sentences with exact character offsets into their contexts."""
    rows = []
    for item_id, ctx in CONTEXTS.items():
        start = 0
        for idx, part in enumerate(ctx.split(". ")):
            text = part if part.endswith(".") else part + "."
            begin = ctx.index(text, start)
            rows.append(
                {"item_id": item_id, "sent_idx": idx, "key": text_key(text), "text": text, "char_start": begin,
                 "char_end": begin + len(text), "label": "conflict" if idx == 0 else None}  # fmt: skip
            )
            start = begin + len(text)
    return rows


def _statements() -> list[dict]:
    texts = [("Paris is in France.", 0, "paris", "train"), ("Paris is in Italy.", 1, "paris", "train"),
             ("The Nile is in Egypt.", 0, "nile", "test"), ("The Nile is in Peru.", 1, "nile", "test")]  # fmt: skip
    return [
        {"stmt_id": f"s{i}", "key": text_key(t), "text": t, "label": y, "group": g, "split": s}
        for i, (t, y, g, s) in enumerate(texts)
    ]


def write_activations(
    paths: RunPaths, keys: list[str], slug: str = "tiny", nan_at: tuple[int, int] | None = None
) -> None:
    """A small hive-partitioned activation store plus its meta.json."""
    rng = np.random.default_rng(0)
    for layer in LAYERS:
        vec = rng.normal(size=(len(keys), DIM)).astype(np.float32)
        if nan_at is not None and layer == nan_at[0]:
            vec[nan_at[1], 3] = np.nan
        table = pa.table(
            {"key": keys, "source": ["statements"] * len(keys), "position": ["last"] * len(keys),
             "context_key": [None] * len(keys),
             "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), DIM)},  # fmt: skip
            schema=T.activations_schema(DIM),
        )
        out = paths.activations / f"model={slug}" / f"layer={layer}" / "part-00000.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    meta = {"model": slug, "layers": LAYERS, "dim": DIM, "n_keys": len(keys), "rows_by_position": {"last": len(keys)}}
    write_json(meta, paths.activations / f"model={slug}" / "meta.json")


def write_good_run(paths: RunPaths) -> None:
    """Every table of a run, small and consistent."""
    items = [
        {"item_id": i, "dataset": "toy", "split": SPLIT_OF[i], "group": i, "question": "Where?", "context": c,
         "answers": ["Italy"], "orig_answers": ["France"], "counterfactual": True}  # fmt: skip
        for i, c in CONTEXTS.items()
    ]
    write_parquet(items, paths.table("items"), T.ITEMS)
    statements = _statements()
    write_parquet(statements, paths.table("statements"), T.STATEMENTS)
    write_parquet([], paths.table("rejects"), T.REJECTS)
    sentences = _sentences()
    write_parquet(sentences, paths.table("sentences"), T.SENTENCES)
    write_activations(paths, [s["key"] for s in statements])
    write_parquet(
        [{"layer": la, "probe": "logistic", "position": "last", "split": sp, "n": 2, "accuracy": 0.5, "f1": 0.5,
          "auroc": 0.75}
         for la in LAYERS for sp in ("train", "test")],  # fmt: skip
        paths.table("probe_metrics"),
        T.PROBE_METRICS,
    )
    write_parquet(
        [{"layer": la, "probe": "logistic", "position": "last", "pruning": pr, "n": 4, "positives": 2, "flagged": 1,
          "true_flags": 1, "precision": 1.0, "recall": 0.5, "f1": 2 / 3}
         for la in LAYERS for pr in ("none", "gold")],  # fmt: skip
        paths.table("probe_localisation"),
        T.PROBE_LOCALISATION,
    )
    write_parquet(
        [{"item_id": s["item_id"], "sent_idx": s["sent_idx"], "key": s["key"], "layer": 2, "probe": "logistic",
          "p_conflict": 0.9 if s["sent_idx"] == 0 else 0.1, "flagged": s["sent_idx"] == 0}
         for s in sentences],  # fmt: skip
        paths.table("sentence_scores"),
        T.SENTENCE_SCORES,
    )
    write_parquet(
        [{"method": m, "item_id": i, "prompt": "p", "prediction": "Italy", "em": 1.0, "f1": 1.0,
          "ps": True, "po": False}
         for m in ("closed_book", "clear") for i in CONTEXTS],  # fmt: skip
        paths.table("predictions"),
        T.PREDICTIONS,
    )
    bounds = (("", 0.5), ("_lo", 0.25), ("_hi", 0.75))
    metric = {f"{m}{s}": v for m in ("em", "f1", "ps", "po", "mr") for s, v in bounds}
    rows = [{"method": m, "condition": "all", "knowledge": "all", "n": 3, **metric} for m in ("closed_book", "clear")]
    write_parquet(rows, paths.table("metrics"), T.METRICS)
    paired = [{"method": "clear", "reference": "closed_book", "condition": "all", "knowledge": "all", "metric": m,
               "n": 3, "diff": 0.0, "lo": 0.0, "hi": 0.0, **({"n_better": 0, "n_worse": 0, "p_mcnemar": 1.0}
                                                          if m in ("ps", "em") else {})}
              for m in ("ps", "em", "f1", "mr")]  # fmt: skip
    write_parquet(paired, paths.table("comparisons"), T.COMPARISONS)
    lfd = [{"layer": la, "iks": 0.01 * (4 - la), "n_items": 3, "candidate": la == 2, "chosen": la == 2} for la in range(4)]
    write_parquet(lfd, paths.table("lfd_layers"), T.LFD_LAYERS)
    write_insideout(paths)


def write_insideout(paths: RunPaths) -> None:
    """Inside-Out tables of the dev and test items: a correct and an incorrect candidate each, ranked right."""
    scores = [{"item_id": i, "split": SPLIT_OF[i], "cand_idx": c, "answer": a, "correct": c == 0,
               "source": "true" if c == 0 else "counterfactual", "n_tokens": 1, "scorer": scorer, "layer": layer,
               "score": (-1.0 if c == 0 else -2.0) if scorer == "external" else (1.0 if c == 0 else -1.0)}
              for i in ("i2", "i3") for c, a in enumerate(("France", "Italy"))
              for scorer, layer in (("external", None), ("internal", 2))]  # fmt: skip
    write_parquet(scores, paths.table("insideout_scores"), T.INSIDEOUT_SCORES)
    k = [{"item_id": i, "split": SPLIT_OF[i], "scorer": scorer, "layer": layer, "n_correct": 1, "n_incorrect": 1,
          "k": 1.0, "k_star": True} for i in ("i2", "i3") for scorer, layer in (("external", None), ("internal", 2))]
    write_parquet(k, paths.table("insideout_k"), T.INSIDEOUT_K)
    layers = [{"split": sp, "scorer": scorer, "layer": layer, "n_items": 1, "mean_k": 1.0, "mean_k_lo": 1.0,
               "mean_k_hi": 1.0, "k_star": 1.0, "chosen": layer == 2,
               **({"hidden_share": 0.0, "hidden_share_lo": 0.0, "hidden_share_hi": 0.0, "gap": 0.0, "gap_lo": 0.0,
                   "gap_hi": 0.0, "l2": 0.1} if layer is not None else {})}
              for sp in ("dev", "test") for scorer, layer in (("external", None), ("internal", 2))]  # fmt: skip
    write_parquet(layers, paths.table("insideout_layers"), T.INSIDEOUT_LAYERS)


@pytest.fixture()
def good_run(run_paths):
    write_good_run(run_paths)
    return run_paths


def test_every_stage_of_a_good_run_passes_and_writes_its_json(good_run):
    """All suites pass on consistent tables, and each result lands in quality/<table>.json."""
    for stage in STAGES.values():
        results = validate_tables(stage.suites, good_run)
        assert sorted(results) == sorted(stage.suites)
        for table, res in results.items():
            assert res["success"], (table, res)
            assert res["evaluated"] >= 2 and res["failed"] == 0
            saved = json.loads((good_run.quality / f"{table}.json").read_text())
            assert saved["success"] is True and saved["table"] == table
    assert validate("activations", good_run)["n_rows"] == len(LAYERS) * 4


def test_duplicate_id_is_named_with_its_count(good_run):
    """A repeated item_id fails the uniqueness expectation; the message quotes the id and the count."""
    import polars as pl

    items = pl.read_parquet(good_run.table("items"))
    write_parquet(pl.concat([items, items.head(1)]), good_run.table("items"), T.ITEMS)
    with pytest.raises(DataQualityError) as err:
        validate("items", good_run)
    msg = str(err.value)
    assert "'items'" in msg and "1 of" in msg and "expectations failed" in msg
    assert "expect_column_values_to_be_unique [item_id]" in msg
    assert "unexpected_count=2" in msg and "'i1'" in msg
    saved = json.loads((good_run.quality / "items.json").read_text())
    assert saved["success"] is False and saved["failed"] == 1


def test_bad_offset_and_straddling_group_fail(good_run):
    """A sentence whose span does not match its context, and a subject in two splits, are caught."""
    rows = _sentences()
    rows[1]["char_start"] += 1  # one character off
    write_parquet(rows, good_run.table("sentences"), T.SENTENCES)
    with pytest.raises(DataQualityError) as err:
        validate("sentences", good_run)
    assert "[offset_ok]" in str(err.value) and "unexpected_count=1" in str(err.value)

    stmts = _statements()
    stmts[0]["split"] = "dev"  # group "paris" now in train and dev
    write_parquet(stmts, good_run.table("statements"), T.STATEMENTS)
    with pytest.raises(DataQualityError, match=r"n_splits_of_group.*unexpected_count=2"):
        validate("statements", good_run)


def test_nan_vector_and_missing_key_fail_activations(good_run):
    """A NaN inside one vector fails the finite count; a layer short of a key fails the row count."""
    keys = [s["key"] for s in _statements()]
    write_activations(good_run, keys, nan_at=(2, 1))
    with pytest.raises(DataQualityError) as err:
        validate("activations", good_run)
    msg = str(err.value)
    assert "1 of" in msg and "[n_finite, dim]" in msg and "unexpected_count=1" in msg

    write_activations(good_run, keys)
    short = good_run.activations / "model=tiny" / "layer=0" / "part-00000.parquet"
    pq.write_table(pq.read_table(short).slice(0, 3), short)
    with pytest.raises(DataQualityError, match=r"\[layer_rows, meta_n_rows\]: unexpected_count=3"):
        validate("activations", good_run)


def test_stage_reports_every_failing_table_and_out_of_range_scores(good_run):
    """validate_tables checks all of a stage's tables before raising one error naming each failure."""
    write_parquet(
        [{"method": "clear", "condition": "all", "knowledge": "all", "n": 0, "em": 1.5, "f1": 0.5, "ps": 0.5, "po": 0.5}],
        good_run.table("metrics"), T.METRICS
    )
    with pytest.raises(DataQualityError) as err:
        validate_tables(STAGES["evaluate"].suites, good_run)
    assert err.value.tables == ["comparisons", "metrics"]  # comparisons no longer in step with the broken metrics
    assert "n_matches_metrics" in str(err.value)
    assert "2 of" in str(err.value) and "[em]" in str(err.value) and "[n]" in str(err.value)
    assert json.loads((good_run.quality / "predictions.json").read_text())["success"] is True


def test_null_auroc_allowed_only_for_a_single_class_split(good_run):
    """AUROC is undefined on a one-class split, so null is fine there and nowhere else."""
    rows = [{"layer": 0, "probe": "logistic", "position": "last", "split": "test", "n": 2, "accuracy": 0.5, "f1": 0.0,
             "auroc": None}]
    write_parquet(rows, good_run.table("probe_metrics"), T.PROBE_METRICS)
    with pytest.raises(DataQualityError, match="auroc_null_ok"):
        validate("probe_metrics", good_run)
    stmts = [s for s in _statements() if not (s["split"] == "test" and s["label"] == 1)]
    write_parquet(stmts, good_run.table("statements"), T.STATEMENTS)
    assert validate("probe_metrics", good_run)["success"]


def test_missing_table_is_a_clear_error(run_paths):
    with pytest.raises(FileNotFoundError, match="items.parquet"):
        validate("items", run_paths)


def test_validation_is_fast_after_warm_up(good_run):
    """After GX is imported and the context built, one table validates in well under a second."""
    validate("metrics", good_run)
    res = validate("metrics", good_run)
    assert res["validate_s"] < 1.0 and not math.isnan(res["validate_s"])


def test_fact_units_and_rejects_are_checked(good_run):
    """A fact may differ from its span (it is a rewrite) but must lie inside the context; rejects need a known reason."""
    rows = _sentences()
    rows[1] |= {"text": "A rewritten fact.", "unit": "fact", "source_idx": 1}
    write_parquet(rows, good_run.table("sentences"), T.SENTENCES)
    validate("sentences", good_run)  # a fact's text is not its span: fine
    rows[1]["char_end"] = 10_000  # ... but its span must still be inside the context
    write_parquet(rows, good_run.table("sentences"), T.SENTENCES)
    with pytest.raises(DataQualityError, match=r"\[offset_ok\].*unexpected_count=1"):
        validate("sentences", good_run)

    reject = {"source": "f.json", "record": 3, "record_id": None, "reason": "empty_answers", "detail": "d", "raw": "{}"}
    write_parquet([reject], good_run.table("rejects"), T.REJECTS)
    validate("rejects", good_run)
    write_parquet([reject, {**reject, "record": 4, "reason": "because"}], good_run.table("rejects"), T.REJECTS)
    with pytest.raises(DataQualityError, match=r"\[reason\].*'because'"):
        validate("rejects", good_run)


def test_schemas_import_nothing_from_tasks():
    """The contracts sit below the code that fulfils them: importing every schemas module loads no tasks module."""
    root = Path(__file__).resolve().parents[1]
    modules = sorted(f"schemas.{p.stem}" for p in (root / "schemas").glob("*.py") if p.stem != "__init__")
    assert {"schemas.suites", "schemas.tables", "schemas.rejects"} <= set(modules)
    code = (f"import sys, {', '.join(modules)}\n"
            "bad = sorted(m for m in sys.modules if m == 'tasks' or m.startswith('tasks.'))\n"
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
