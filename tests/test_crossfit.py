"""Cross-fitting: the fine-tuning contexts' markers come from probes that never saw those sentences."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from schemas.tables import ITEMS, SENTENCE_SCORES, SENTENCES, STATEMENTS
from tasks.activations.stage import run_activations
from tasks.catalog.views import query
from tasks.core.activation_store import ActivationStore
from tasks.core.config import RunConfig
from tasks.core.quality import DataQualityError, validate
from tasks.core.storage import RunPaths, model_slug, read_table, write_parquet
from tasks.decompose.stage import run_decompose
from tasks.ingest.stage import run_ingest
from tasks.probes.crossfit import SCORED_BY_SQL, assign_folds, marker_line, plan_folds
from tasks.probes.kinds import KINDS
from tasks.probes.kinds.linear import LinearProbe
from tasks.probes.stage import run_probes


def config(tiny_model: str, runs_dir: Path, run: str = "base", seed: int = 0, **probe) -> RunConfig:
    """A known-facts v2 run on the tiny model (the default dataset: every context sentence is a statement)."""
    return RunConfig.model_validate({"run": run, "runs_dir": str(runs_dir), "limit": 60, "seed": seed,
                                     "model": {"name": tiny_model}, "probe": probe})


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> RunPaths:
    """Ingest, decompose and activations of one run, done once; each test probes a copy."""
    runs = tmp_path_factory.mktemp("crossfit-runs")
    cfg = config(tiny_model, runs)
    paths = RunPaths(runs / "base")
    paths.root.mkdir(parents=True)
    for stage in (run_ingest, run_decompose, run_activations):
        stage(cfg, paths)
    return paths


def probed(prepared: RunPaths, tiny_model: str, runs_dir: Path, name: str, reorder: bool = False, seed: int = 0,
           **probe) -> RunPaths:
    """A copy of the prepared run (its tables in shuffled row order with `reorder`), through the probes stage."""
    paths = RunPaths(runs_dir / name)
    shutil.copytree(prepared.root, paths.root, symlinks=True)
    if reorder:
        for table, schema in (("statements", STATEMENTS), ("sentences", SENTENCES), ("items", ITEMS)):
            frame = read_table(paths.table(table))
            write_parquet(frame.sample(fraction=1.0, shuffle=True, seed=7), paths.table(table), schema)
    run_probes(config(tiny_model, runs_dir, name, seed, **probe), paths)
    return paths


def scored_units(paths: RunPaths) -> pl.DataFrame:
    """sentence_scores with each unit's text and its item's split."""
    sentences = read_table(paths.table("sentences")).select("item_id", "sent_idx", "text")
    items = read_table(paths.table("items")).select("item_id", "split")
    return read_table(paths.table("sentence_scores")).join(sentences, on=["item_id", "sent_idx"]).join(
        items, on="item_id")


def fitted_stmts(paths: RunPaths, label: str) -> set[str]:
    """The stmt_ids a fold probe records it was fitted on."""
    return set(json.loads((paths.probes / f"{label}.json").read_text())["fitted_stmts"])


def related_statements(statements: pl.DataFrame) -> dict[str, set[str]]:
    """text -> the stmt_ids that share its text, its fact or its subject, from the statements table alone.

    known-facts stmt_ids are kf-<known_id>-<label>, so a fact is the id without its label; the subject is the group.
    """
    by = {"text": defaultdict(set), "fact": defaultdict(set), "group": defaultdict(set)}
    rows = statements.select("stmt_id", "text", "group").iter_rows()
    for sid, text, group in rows:
        for name, value in (("text", text), ("fact", sid.rsplit("-", 1)[0]), ("group", group)):
            by[name][value].add(sid)
    fact_of = {sid: sid.rsplit("-", 1)[0] for sid in statements["stmt_id"]}
    group_of = dict(statements.select("stmt_id", "group").iter_rows())
    out = {}
    for text, same in by["text"].items():
        out[text] = same.union(*(by["fact"][fact_of[s]] for s in same), *(by["group"][group_of[s]] for s in same))
    return out


def test_train_units_are_scored_by_probes_that_never_saw_their_sentence_or_fact(prepared, tiny_model, tmp_path):
    paths = probed(prepared, tiny_model, tmp_path, "on")
    statements = read_table(paths.table("statements"))
    units = scored_units(paths)
    train, other = units.filter(pl.col("split") == "train"), units.filter(pl.col("split") != "train")
    assert train.height >= 30 and other.height > 0
    assert set(other["scored_by"]) == {"final"}
    assert all(label.startswith("fold-") for label in train["scored_by"])
    assert len(set(train["scored_by"])) > 1  # several folds share the train contexts

    related = related_statements(statements)
    fitted = {label: fitted_stmts(paths, label) for label in set(train["scored_by"])}
    text_of = dict(statements.select("stmt_id", "text").iter_rows())
    for text, label in train.select("text", "scored_by").iter_rows():
        assert text in related, f"{text!r} is no statement: the check would pass vacuously"
        assert not related[text] & fitted[label], (text, label, sorted(related[text] & fitted[label]))
        assert text not in {text_of[s] for s in fitted[label]}

    # the leak cross-fitting removes: the final probe (train+dev) was fitted on every one of these sentences
    final_pool = set(statements.filter(pl.col("split").is_in(["train", "dev"]))["stmt_id"])
    assert all(related[text] & final_pool for text in train["text"])

    # the recorded membership is what was fitted, and what scored the units
    best = json.loads(paths.best_probe.read_text())
    store = ActivationStore.open(paths.activations, model_slug(tiny_model))
    for label, stmts in fitted.items():
        probe = LinearProbe.load(paths.probes / f"{label}.safetensors")
        assert (probe.meta["kind"], probe.meta["layer"], probe.meta["l2"]) == (best["probe"], best["layer"], best["l2"])
        assert stmts <= final_pool and stmts  # never a test statement
        rows = statements.filter(pl.col("stmt_id").is_in(list(stmts)))
        again = KINDS[best["probe"]].fit(store.vectors(best["layer"], rows["key"].to_list()),
                                         rows["label"].to_numpy().astype(int), best["l2"])
        np.testing.assert_allclose(again.weight, probe.weight, rtol=1e-5, atol=1e-6)
        mine = train.filter(pl.col("scored_by") == label)
        p = probe.predict_proba(store.vectors(best["layer"], mine["key"].to_list()))
        np.testing.assert_array_equal(mine["p_conflict"].to_numpy(), p)
        assert mine["flagged"].to_list() == (p > best["threshold"]).tolist()

    assert best["crossfit_folds"] == 5 and best["crossfit_units"] == train.height
    assert f"the {train.height} units of train-split contexts were scored by 5 cross-fitted" in marker_line(best)
    _, rows = query(SCORED_BY_SQL, tmp_path, run="on")  # the query docs/METHOD.md shows
    assert {(split, by) for split, by, _, _ in rows} == {("dev", "final"), ("test", "final")} | {
        ("train", label) for label in fitted}
    assert sum(n for split, _, n, _ in rows if split == "train") == train.height
    assert SCORED_BY_SQL in (Path(__file__).resolve().parents[1] / "docs" / "METHOD.md").read_text()


@pytest.mark.parametrize("folds", [0, 1])
def test_crossfit_off_keeps_the_old_tables(prepared, tiny_model, tmp_path, folds):
    on = probed(prepared, tiny_model, tmp_path, "on")
    off = probed(prepared, tiny_model, tmp_path, "off", crossfit_folds=folds)
    scores = read_table(off.table("sentence_scores"))
    assert set(scores["scored_by"]) == {"final"} and not list(off.probes.glob("fold-*"))
    best = json.loads(off.best_probe.read_text())
    final = LinearProbe.load(off.probes / "final.safetensors")  # the old behaviour: one probe scores every unit
    X = ActivationStore.open(off.activations, model_slug(tiny_model)).vectors(best["layer"], scores["key"].to_list())
    np.testing.assert_array_equal(scores["p_conflict"].to_numpy(), final.predict_proba(X))
    assert scores["flagged"].to_list() == (scores["p_conflict"] > best["threshold"]).to_list()
    assert best["crossfit_folds"] == 0 and best["crossfit_units"] == 0 and "in-sample" in marker_line(best)

    # cross-fitting changes nothing but the train items' scores
    assert read_table(on.table("probe_metrics")).equals(read_table(off.table("probe_metrics")))
    np.testing.assert_array_equal(final.weight, LinearProbe.load(on.probes / "final.safetensors").weight)
    on_best = json.loads(on.best_probe.read_text())
    assert {k: v for k, v in best.items() if not k.startswith("crossfit")} == {
        k: v for k, v in on_best.items() if not k.startswith("crossfit")}
    keys = ["item_id", "sent_idx"]
    both = scored_units(on).join(scores.drop("scored_by"), on=keys, suffix="_off")
    held = both.filter(pl.col("split") != "train")
    assert held["p_conflict"].to_list() == held["p_conflict_off"].to_list()
    train = both.filter(pl.col("split") == "train")
    assert (train["p_conflict"] != train["p_conflict_off"]).mean() > 0.9


def assignment(paths: RunPaths) -> tuple[dict, dict]:
    """Which probe scored each unit, and which statements each fold probe was fitted on."""
    scores = read_table(paths.table("sentence_scores"))
    by_unit = {(i, n): s for i, n, s in scores.select("item_id", "sent_idx", "scored_by").iter_rows()}
    return by_unit, {label: fitted_stmts(paths, label) for label in set(by_unit.values()) - {"final"}}


def test_fold_assignment_is_seeded_and_independent_of_row_order(prepared, tiny_model, tmp_path):
    first = assignment(probed(prepared, tiny_model, tmp_path, "a"))
    assert first == assignment(probed(prepared, tiny_model, tmp_path, "a-again"))
    assert first == assignment(probed(prepared, tiny_model, tmp_path, "shuffled", reorder=True))
    assert first != assignment(probed(prepared, tiny_model, tmp_path, "seed-1", seed=1))

    keys = [f"subject-{i}" for i in range(23)]
    folds = assign_folds(keys, 5, seed=3)
    assert folds == assign_folds(list(reversed(keys)) + keys[:4], 5, seed=3)
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1  # dealt round-robin: balanced


def test_a_unit_linking_two_subjects_puts_both_in_its_fold():
    """An LLM fact whose text is one subject's statement and whose source sentence is another's is scored by a
    probe that saw neither: the two subjects share a fold, under every seed."""
    statements = pl.DataFrame([
        {"stmt_id": f"s{g}-{lab}", "text": f"Subject {g} is {'false' if lab else 'true'}.", "label": lab,
         "group": f"g{g}", "split": "train"} for g in range(10) for lab in (0, 1)])
    context = "Subject 4 is false. Subject 5 is true. Other words."
    items = pl.DataFrame({"item_id": ["a", "b"], "split": ["train", "test"], "group": ["g0", "g6"],
                          "context": [context, "Subject 6 is true."]})
    units = pl.DataFrame({"item_id": ["a", "a", "a", "b"], "text": ["Subject 3 is true", "a rewrite", "Other", "x"],
                          "char_start": [0, 20, 39, 0], "char_end": [19, 38, 51, 18]})
    for seed in range(10):
        plan = plan_folds(statements, units, items, 5, seed, lambda t: t.rstrip("."))
        fold = dict(zip(statements["group"], plan.statement_fold.tolist()))
        assert fold["g3"] == fold["g4"] == plan.unit_fold[0]  # text: subject 3; source sentence: subject 4
        assert plan.unit_fold[1] == fold["g5"] and plan.unit_fold[2] == fold["g0"]  # no statement: the item's
        assert plan.unit_fold[3] == -1  # a test item's unit: the final probe
    with pytest.raises(ValueError, match="absent from items"):
        plan_folds(statements, units, items.head(1), 5, 0, str)


def test_suite_refuses_a_fold_probe_on_a_test_item(prepared, tiny_model, tmp_path):
    paths = probed(prepared, tiny_model, tmp_path, "on")
    assert validate("sentence_scores", paths)["success"]
    scores, items = read_table(paths.table("sentence_scores")), read_table(paths.table("items"))
    test_item = items.filter(pl.col("split") == "test")["item_id"][0]
    bad = scores.with_columns(pl.when(pl.col("item_id") == test_item).then(pl.lit("fold-0"))
                              .otherwise(pl.col("scored_by")).alias("scored_by"))
    write_parquet(bad, paths.table("sentence_scores"), SENTENCE_SCORES)
    with pytest.raises(DataQualityError, match=r"fold_only_on_train"):
        validate("sentence_scores", paths)
    write_parquet(scores.with_columns(pl.lit("fold x").alias("scored_by")), paths.table("sentence_scores"),
                  SENTENCE_SCORES)
    with pytest.raises(DataQualityError, match=r"scored_by"):
        validate("sentence_scores", paths)
