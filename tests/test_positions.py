"""Probe positions on the tiny model: a probe trains and scores on `ctx_last` / `ctx_mean` (the labelled context
units read in context), a position never extracted is one clear error, and relevance pruning holds end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from tasks.activations.stage import run_activations
from tasks.core.activation_store import ActivationStore
from tasks.core.config import RunConfig
from tasks.core.marking import marked_contexts
from tasks.core.prompts import CLOSE, OPEN
from tasks.core.quality import validate
from tasks.core.storage import RunPaths, model_slug, read_table, text_key
from tasks.decompose.stage import run_decompose
from tasks.ingest.stage import run_ingest
from tasks.probes.kinds import KINDS
from tasks.probes.positions import context_rows
from tasks.probes.stage import probe_path, run_probes
from tests.test_crossfit import related_statements
from tests.test_probes import make_statements, with_probe, write_case

POSITIONS = ["last", "ctx_last", "ctx_mean"]


def config(tiny_model: str, runs_dir: Path, run: str, **probe) -> RunConfig:
    """known-facts v2 on the tiny model, every position extracted, the relevance filter keeping 2 units per step."""
    return RunConfig.model_validate({
        "run": run, "runs_dir": str(runs_dir), "limit": 60, "seed": 0, "model": {"name": tiny_model},
        "decompose": {"relevance": True, "top_k": 2}, "activations": {"positions": POSITIONS}, "probe": probe})


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> RunPaths:
    """Ingest, decompose (with relevance) and activations at every position, once; each test probes a copy."""
    runs = tmp_path_factory.mktemp("position-runs")
    paths = RunPaths(runs / "base")
    paths.root.mkdir(parents=True)
    for stage in (run_ingest, run_decompose, run_activations):
        stage(config(tiny_model, runs, "base"), paths)
    return paths


def probed(prepared: RunPaths, tiny_model: str, runs_dir: Path, name: str, **probe) -> RunPaths:
    paths = RunPaths(runs_dir / name)
    shutil.copytree(prepared.root, paths.root, symlinks=True)
    run_probes(config(tiny_model, runs_dir, name, **probe), paths)
    return paths


def stored_vectors(paths: RunPaths, tiny_model: str, layer: int, position: str) -> dict[tuple[str, str], np.ndarray]:
    """(key, context key) -> vector, read from the run's shard files with DuckDB (not through the store reader)."""
    files = f"{paths.activations}/model={model_slug(tiny_model)}/layer={layer}/*.parquet"
    rows = duckdb.sql(f"SELECT key, context_key, vector FROM read_parquet('{files}') WHERE position = '{position}'")
    return {(k, c): np.asarray(v, dtype=np.float32) for k, c, v in rows.fetchall()}


def labelled_pairs(paths: RunPaths) -> pl.DataFrame:
    """Distinct (unit, context) pairs with a truth label, with their item's split and the unit's label, in SQL."""
    con = duckdb.connect()
    for table in ("sentences", "items"):
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{paths.table(table)}')")
    return con.sql("""SELECT DISTINCT s.key, i.context, i.split, NOT s.truthful AS y FROM sentences s
                      JOIN items i USING (item_id) WHERE s.truthful IS NOT NULL""").pl()


def test_ctx_probes_train_on_labelled_units_in_context(prepared, tiny_model, tmp_path):
    paths = probed(prepared, tiny_model, tmp_path, "ctx", positions=POSITIONS, position="ctx_last", crossfit_folds=0)
    metrics = read_table(paths.table("probe_metrics"))
    assert metrics.height == 4 * 2 * 3 * 3  # layers x kinds x positions x splits
    assert validate("probe_metrics", paths)["success"]
    pairs = labelled_pairs(paths)
    n_by_split = dict(pairs.group_by("split").len().iter_rows())
    for position in ("ctx_last", "ctx_mean"):
        rows = metrics.filter(position=position, probe="logistic", layer=1)
        assert dict(rows.select("split", "n").iter_rows()) == n_by_split
    statements_n = dict(read_table(paths.table("statements")).group_by("split").len().iter_rows())
    assert dict(metrics.filter(position="last", probe="logistic", layer=1).select("split", "n").iter_rows()) == \
        statements_n

    # each saved ctx probe reproduces its test AUROC on vectors and labels read by another route
    test = pairs.filter(split="test")
    for layer in range(4):
        vectors = stored_vectors(paths, tiny_model, layer, "ctx_mean")
        X = np.stack([vectors[k, text_key(c)] for k, c in test.select("key", "context").iter_rows()])
        probe = KINDS["diffmean"].load(probe_path(paths, "diffmean", layer, "ctx_mean"))
        expected = metrics.filter(position="ctx_mean", probe="diffmean", layer=layer, split="test")["auroc"][0]
        assert roc_auc_score(test["y"].to_numpy(), probe.predict_proba(X)) == pytest.approx(expected)

    # the flagging probe reads ctx_last, and scores each unit on its own context's vector
    best = json.loads(paths.best_probe.read_text())
    assert best["position"] == "ctx_last" and best["fitted_on"] == ["train", "dev"]
    final = KINDS[best["probe"]].load(paths.probes / "final.safetensors")
    assert final.meta["position"] == "ctx_last"
    vectors = stored_vectors(paths, tiny_model, best["layer"], "ctx_last")
    context = dict(read_table(paths.table("items")).select("item_id", "context").iter_rows())
    scores = read_table(paths.table("sentence_scores"))
    X = np.stack([vectors[k, text_key(context[i])] for i, k in scores.select("item_id", "key").iter_rows()])
    np.testing.assert_allclose(scores["p_conflict"].to_numpy(), final.predict_proba(X), rtol=1e-6)


def test_ctx_fold_probes_never_saw_the_units_they_score(prepared, tiny_model, tmp_path):
    """Cross-fitting at a context position: a fold probe's rows hold no unit of the same text, fact or subject."""
    paths = probed(prepared, tiny_model, tmp_path, "folds", positions=["ctx_last"], position="ctx_last")
    sentences = read_table(paths.table("sentences"))
    text_of_row = {f"{i}:{j}": t for i, j, t in sentences.select("item_id", "sent_idx", "text").iter_rows()}
    statements = read_table(paths.table("statements"))
    related = related_statements(statements)
    stmt_text = dict(statements.select("stmt_id", "text").iter_rows())
    units = read_table(paths.table("sentence_scores")).join(sentences.select("item_id", "sent_idx", "text"),
                                                            on=["item_id", "sent_idx"])
    folded = units.filter(pl.col("scored_by").str.starts_with("fold-"))
    assert folded.height >= 30 and len(set(folded["scored_by"])) > 1
    for text, label in folded.select("text", "scored_by").iter_rows():
        seen = {text_of_row[r] for r in json.loads((paths.probes / f"{label}.json").read_text())["fitted_stmts"]}
        assert text in related, f"{text!r} is no statement: the check would pass vacuously"
        assert not seen & {stmt_text[s] for s in related[text]}, (text, label)


def test_relevance_on_no_irrelevant_unit_is_flagged_or_marked(prepared, tiny_model, tmp_path):
    paths = probed(prepared, tiny_model, tmp_path, "pruned", threshold=0.01)  # the probe flags nearly everything
    sentences = read_table(paths.table("sentences"))
    scores = read_table(paths.table("sentence_scores")).join(
        sentences.select("item_id", "sent_idx", "is_relevant", "text"), on=["item_id", "sent_idx"])
    assert scores.height == sentences.height  # activations.sentences=all: every unit scored
    dropped = scores.filter(~pl.col("is_relevant"))
    assert dropped.height and (dropped["p_conflict"] > 0.01).sum() > 0  # unpruned, the probe would flag them
    assert not dropped["flagged"].any() and scores.filter(pl.col("is_relevant"))["flagged"].any()
    marked = marked_contexts(paths)
    for item_id, text in dropped.select("item_id", "text").iter_rows():
        assert f"{OPEN} {text} {CLOSE}" not in marked[item_id]

    per_layer = read_table(paths.table("probe_localisation"))
    assert validate("probe_localisation", paths)["success"]
    assert sorted(per_layer.select("layer", "pruning").rows()) == [
        (layer, p) for layer in range(4) for p in sorted(["filter", "gold", "none"])]
    wide = per_layer.pivot(on="pruning", index="layer", values="flagged")
    assert (wide["filter"] <= wide["none"]).all() and (wide["gold"] <= wide["none"]).all()
    assert (wide["filter"] < wide["none"]).any()


def test_a_position_never_extracted_is_one_clear_line(tiny_cfg, run_paths):
    write_case(run_paths, tiny_cfg, make_statements(), {0: {"train": 4.0, "dev": 4.0, "test": 4.0}})
    cfg = with_probe(tiny_cfg, position="ctx_mean")  # model_copy: the config check is bypassed, the store's is not
    with pytest.raises(ValueError) as err:
        run_probes(cfg, run_paths)
    message = str(err.value)
    assert "\n" not in message and "probe position(s) ['ctx_mean'] were not extracted" in message
    assert "`clearflow stage activations --run t --activations.positions last,ctx_mean`" in message
    assert not run_paths.table("probe_metrics").exists()
    with pytest.raises(ValueError, match=r"probe position\(s\) \['ctx_last'\] are not extracted: add them with "
                                         r"--activations.positions last,ctx_last"):
        RunConfig.model_validate({"probe": {"positions": ["last", "ctx_last"]}})


def test_context_rows_labels_splits_and_groups():
    """Hand-made units: one row per (text, context), label = not truthful, group = the statement's subject when it
    shares the item's split, else the item's group; pairs whose items disagree are dropped."""
    statements = pl.DataFrame({"text": ["A is B", "C is D"], "group": ["A", "C"], "split": ["train", "test"]})
    items = pl.DataFrame({"item_id": ["i1", "i2", "i3"], "context": ["A is B. X is Y.", "A is B. X is Y.", "C is D."],
                          "split": ["train", "train", "train"], "group": ["g1", "g2", "g3"]})
    units = pl.DataFrame({
        "item_id": ["i1", "i1", "i2", "i2", "i3"], "sent_idx": [0, 1, 0, 1, 0],
        "key": ["kA", "kX", "kA", "kX", "kC"], "text": ["A is B.", "X is Y.", "A is B.", "X is Y.", "C is D."],
        "char_start": [0, 8, 0, 8, 0], "char_end": [7, 15, 7, 15, 7], "truthful": [True, False, True, None, False]})
    rows = context_rows(statements, units, items, lambda t: t.rstrip("."))
    assert rows.select("stmt_id", "key", "label", "group", "split").rows() == [
        ("i1:0", "kA", 0, "A", "train"),  # i2's copy of the same (text, context) is the same row
        ("i1:1", "kX", 1, "g1", "train"),  # no statement: the item's group
        ("i3:0", "kC", 1, "g3", "train"),  # C's statements are test: the item's group, so no group straddles
    ]
    assert rows["context_key"].to_list() == [text_key("A is B. X is Y."), text_key("A is B. X is Y."),
                                             text_key("C is D.")]
    with pytest.raises(ValueError, match="--probe.position last"):
        context_rows(statements, units.with_columns(pl.lit(None, pl.Boolean).alias("truthful")), items, str)


def test_the_store_reader_and_duckdb_agree_on_ctx_rows(prepared, tiny_model):
    """row_vectors reads (key, context) rows in the order asked, as DuckDB reads the files."""
    from tasks.probes.positions import row_vectors, unit_rows

    units, items = read_table(prepared.table("sentences")), read_table(prepared.table("items"))
    store = ActivationStore.open(prepared.activations, model_slug(tiny_model))
    got = row_vectors(store, 2, "ctx_mean", unit_rows(units, items))
    direct = stored_vectors(prepared, tiny_model, 2, "ctx_mean")
    context = dict(items.select("item_id", "context").iter_rows())
    want = np.stack([direct[k, text_key(context[i])] for i, k in units.select("item_id", "key").iter_rows()])
    np.testing.assert_array_equal(got, want)
