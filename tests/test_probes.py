"""Probes stage: accuracy on separable data, faithful save/load, dev-only layer choice, scores, no leakage."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from schemas.tables import ITEMS, SENTENCES, STATEMENTS, activations_schema
from tasks.activations.stage import vectors_table
from tasks.core.activation_store import ActivationStore
from tasks.core.config import ProbeConfig
from tasks.probes.kinds import KINDS
from tasks.probes.kinds.diffmean import fit_diffmean
from tasks.probes.kinds.linear import LinearProbe
from tasks.probes.kinds.logistic import fit_logistic
from tasks.probes.selection import check_splits, select_best, split_metrics
from tasks.probes.stage import BEST_KEYS, fit_on_dev, probe_path, run_probes
from tasks.core.marking import marked_contexts
from tasks.core.prompts import CLOSE, OPEN
from tasks.core.storage import model_slug, read_table, write_json, write_parquet

DIM = 16
N_PER_SPLIT = {"train": 120, "dev": 40, "test": 40}


def make_statements(seed: int = 0) -> pl.DataFrame:
    """Statements in pairs (true, false) per subject; each subject sits in one split."""
    rows = []
    for split, n in N_PER_SPLIT.items():
        for i in range(n):
            label = i % 2
            rows.append({"stmt_id": f"{split}{i}", "key": f"k-{split}-{i}", "text": f"{split} {i}", "label": label,
                         "group": f"{split}-subject{i // 2}", "relation_id": "P1", "split": split})
    return pl.DataFrame(rows)


def signal(labels: np.ndarray, strength: float, rng: np.random.Generator, shift: float = 3.0) -> np.ndarray:
    """Gaussian vectors whose first axis separates the labels with `strength` (0 = pure noise)."""
    x = rng.normal(size=(len(labels), DIM)).astype(np.float32) + shift
    x[:, 0] += strength * (2 * labels - 1)
    return x


def write_case(paths, cfg, statements: pl.DataFrame, strengths: dict[int, dict[str, float]], seed: int = 0,
               sentence_keys: int = 10, relevant: list[bool] | None = None) -> None:
    """Statements, sentences and fake activations per layer with given per-split separability.

    With `relevant` (one flag per sentence row), only keys of relevant rows get activations, as in
    activations.sentences='relevant'.
    """
    write_parquet(statements, paths.table("statements"), STATEMENTS)
    slug = model_slug(cfg.model.name)
    rng = np.random.default_rng(seed)
    sent_keys = [f"sent-{i}" for i in range(sentence_keys)]
    sentences = [{"item_id": f"item{i // 3}", "sent_idx": i % 3, "key": k, "text": k, "char_start": 0,
                  "char_end": 1, "relevance": None, "label": None, "truthful": None,
                  "is_relevant": None if relevant is None else relevant[i]}
                 for i, k in enumerate(sent_keys + sent_keys[:2])]  # two sentences repeat a key
    write_parquet(sentences, paths.table("sentences"), SENTENCES)
    items = [{"item_id": i, "dataset": "toy", "split": "test", "group": i, "question": "q", "context": "c",
              "answers": ["a"], "counterfactual": True} for i in sorted({r["item_id"] for r in sentences})]
    write_parquet(items, paths.table("items"), ITEMS)  # test items: the final probe scores every unit (no cross-fit)
    kept = {r["key"] for r in sentences if relevant is None or r["is_relevant"]}
    labels = statements["label"].to_numpy()
    for layer, per_split in strengths.items():
        vectors = np.empty((statements.height, DIM), dtype=np.float32)
        for split, strength in per_split.items():
            sel = (statements["split"] == split).to_numpy()
            vectors[sel] = signal(labels[sel], strength, rng)
        sent_vec = signal(np.arange(sentence_keys) % 2, 4.0, rng)[[k in kept for k in sent_keys]]
        keys = statements["key"].to_list() + [k for k in sent_keys if k in kept]
        sources = ["statements"] * statements.height + ["sentences"] * len(sent_vec)
        table = vectors_table(keys, sources, np.concatenate([vectors, sent_vec]))
        write_parquet(table, paths.activations / f"model={slug}" / f"layer={layer}" / "part-last-00000.parquet",
                      activations_schema(DIM))
    write_json({"layers": sorted(strengths), "dim": DIM, "position": "last"},
               paths.activations / f"model={slug}" / "meta.json")


def with_probe(cfg, **probe):
    return cfg.model_copy(update={"probe": cfg.probe.model_copy(update=probe)})


def test_fitters_separate_separable_data():
    rng = np.random.default_rng(1)
    y = np.arange(400) % 2
    X = signal(y, 3.0, rng)
    for fit in (fit_logistic, fit_diffmean):
        p = fit(X[:300], y[:300], 1.0).predict_proba(X[300:])
        assert ((p > 0.5) == y[300:]).mean() > 0.9
    with pytest.raises(ValueError, match=r"^the train split has only label\(s\) \[0\]: a probe needs both 0 and 1$"):
        fit_logistic(X[:10], np.zeros(10, dtype=int), 1.0)


def test_split_metrics_by_hand():
    """Flags are p > threshold (strict); AUROC needs both labels; F1 with nothing flagged and nothing true is 0."""
    p, y = np.array([0.5, 0.7, 0.2, 0.9]), np.array([0, 1, 0, 0])
    # flags 0, 1, 0, 1: accuracy 3/4; one true positive, one false positive, no miss: F1 = 2 / (2 + 1) = 2/3;
    # AUROC: the positive (0.7) outranks 2 of the 3 negatives = 2/3
    got = split_metrics(p, y, 0.5)
    assert got.keys() == {"n", "accuracy", "f1", "auroc"}
    assert got["n"] == 4 and got["accuracy"] == 0.75
    assert got["f1"] == pytest.approx(2 / 3) and got["auroc"] == pytest.approx(2 / 3)
    assert split_metrics(np.array([0.9]), np.array([1]), 0.5) == {"n": 1, "accuracy": 1.0, "f1": 1.0, "auroc": None}
    assert split_metrics(np.array([0.1, 0.2]), np.array([0, 0]), 0.5) == {"n": 2, "accuracy": 1.0, "f1": 0.0,
                                                                          "auroc": None}
    assert split_metrics(np.array([]), np.array([]), 0.5) == {"n": 0, "accuracy": None, "f1": None, "auroc": None}


def test_a_kind_without_a_strength_to_tune_fits_once_at_strength_one():
    rng = np.random.default_rng(3)
    y = np.arange(80) % 2
    X = signal(y, 2.0, rng)
    probe, strength = KINDS["diffmean"].fit_on_dev(X[:60], y[:60], X[60:], y[60:], ProbeConfig(), 0)
    assert strength == 1.0
    np.testing.assert_array_equal(probe.weight, fit_diffmean(X[:60], y[:60], 1.0).weight)


def test_a_saved_probe_is_a_self_describing_float32_safetensors_file(tmp_path):
    from safetensors import safe_open

    for meta, kind in (({"kind": "diffmean"}, "diffmean"), ({}, "linear")):
        path = LinearProbe(np.array([[1.0, 2.0, 3.0]]), -0.5, meta).save(tmp_path / f"{kind}.safetensors")
        with safe_open(str(path), framework="numpy") as f:
            assert f.metadata() == {"kind": kind}
            assert {k: (f.get_tensor(k).dtype, f.get_tensor(k).shape) for k in f.keys()} == {
                "weight": (np.float32, (3,)), "bias": (np.float32, ())}


def test_a_probe_refuses_features_of_another_width_by_name():
    probe = LinearProbe(np.ones(3), 0.0)
    assert probe.dim == 3
    for X in (np.ones((2, 4)), np.ones(3)):
        with pytest.raises(ValueError, match="^" + re.escape(f"expected features of shape (n, 3), got {X.shape}") + "$"):
            probe.predict_proba(X)


def test_a_probe_without_its_metadata_file_still_loads(tmp_path):
    """The .json beside a probe is metadata only: a probe copied without it keeps its weights and has no meta."""
    path = LinearProbe(np.array([1.5, -2.0, 0.25]), 0.75, {"kind": "logistic"}).save(tmp_path / "p.safetensors")
    assert json.loads(path.with_suffix(".json").read_text()) == {"kind": "logistic"}
    path.with_suffix(".json").unlink()
    probe = LinearProbe.load(path)
    assert probe.meta == {} and probe.bias == 0.75
    np.testing.assert_array_equal(probe.weight, np.array([1.5, -2.0, 0.25], dtype=np.float32))


def test_run_probes_metrics_files_and_reload(tiny_cfg, run_paths):
    statements = make_statements()
    strong = {"train": 4.0, "dev": 4.0, "test": 4.0}
    write_case(run_paths, tiny_cfg, statements, {0: strong, 1: strong})
    run_probes(tiny_cfg, run_paths)

    metrics = read_table(run_paths.table("probe_metrics"))
    assert metrics.height == 2 * 2 * 3  # layers x kinds x splits
    test_rows = metrics.filter(pl.col("split") == "test")
    assert (test_rows["auroc"] > 0.95).all() and (test_rows["accuracy"] > 0.85).all()
    assert metrics.filter(pl.col("split") == "dev")["n"].to_list() == [40] * 4

    slug = model_slug(tiny_cfg.model.name)
    X = ActivationStore.open(run_paths.activations, slug).vectors(1, statements["key"].to_list())
    for kind in ("logistic", "diffmean"):
        path = probe_path(run_paths, kind, 1)
        probe = LinearProbe.load(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["kind"] == kind and meta["layer"] == 1 and meta["dim"] == DIM
        assert probe.weight.shape == (DIM,) and probe.weight.dtype == np.float32
        # reloaded probe reproduces the stored metrics exactly
        sel = (statements["split"] == "test").to_numpy()
        again = split_metrics(probe.predict_proba(X[sel]), statements["label"].to_numpy()[sel], 0.5)
        assert again == meta["metrics"]["test"]
    # save -> load round trip is bit-identical
    probe = LinearProbe.load(probe_path(run_paths, "logistic", 0))
    probe.save(run_paths.root / "copy.safetensors")
    np.testing.assert_array_equal(LinearProbe.load(run_paths.root / "copy.safetensors").predict_proba(X),
                                  probe.predict_proba(X))


def test_unknown_probe_kind_is_refused_before_any_fit(tiny_cfg, run_paths):
    write_case(run_paths, tiny_cfg, make_statements(), {0: {"train": 4.0, "dev": 4.0, "test": 4.0}})
    for probe in ({"kinds": ["logistic", "lda"]}, {"select_kind": "lda"}):
        known = r"known: \['diffmean', 'logistic', 'mlp'\]"
        with pytest.raises(ValueError, match=r"unknown probe kind\(s\) \['lda'\]; " + known):
            run_probes(with_probe(tiny_cfg, **probe), run_paths)
        assert not run_paths.table("probe_metrics").exists() and not list(run_paths.probes.glob("*.safetensors"))


def test_best_layer_is_chosen_on_dev_not_test(tiny_cfg, run_paths):
    # layer 0: dev separable, test noise; layer 1: dev noise, test separable -> dev must win
    strengths = {0: {"train": 4.0, "dev": 4.0, "test": 0.0}, 1: {"train": 4.0, "dev": 0.0, "test": 4.0}}
    write_case(run_paths, tiny_cfg, make_statements(), strengths)
    run_probes(tiny_cfg, run_paths)
    best = json.loads((run_paths.probes / "best.json").read_text())
    assert tuple(sorted(best)) == tuple(sorted(BEST_KEYS))
    assert best["layer"] == 0 and best["probe"] == "logistic" and best["dev_auroc"] > 0.95
    assert best["test_auroc"] < 0.8  # test disagreed, and was not looked at
    assert best["threshold"] == 0.5 and best["model"] == tiny_cfg.model.name
    metrics = read_table(run_paths.table("probe_metrics"))
    best_test = metrics.filter((pl.col("split") == "test") & (pl.col("probe") == "logistic")).sort("auroc")[-1]
    assert best_test["layer"][0] == 1

    run_probes(with_probe(tiny_cfg, layer=1), run_paths)  # a forced layer overrides the choice
    assert json.loads((run_paths.probes / "best.json").read_text())["layer"] == 1


def test_select_best_ties_prefer_smaller_layer_and_stay_at_their_position():
    metrics = pl.DataFrame({"layer": [3, 1, 2, 1, 0, 2], "probe": ["logistic"] * 3 + ["diffmean"] + ["logistic"] * 2,
                            "position": ["last"] * 4 + ["ctx_last"] * 2,
                            "split": ["dev"] * 6, "auroc": [0.9, 0.9, 0.8, 0.99, 0.7, 0.95]})
    assert select_best(metrics, "logistic")["layer"] == 1
    assert select_best(metrics, "diffmean")["layer"] == 1
    assert select_best(metrics, "logistic", "ctx_last") == {"layer": 2, "dev_auroc": 0.95}
    assert select_best(metrics, "logistic", forced_layer=2) == {"layer": 2, "dev_auroc": 0.8}  # forced, with its AUROC
    nan_best = metrics.with_columns(pl.when(pl.col("layer") == 2).then(float("nan")).otherwise(pl.col("auroc"))
                                    .alias("auroc"))
    assert select_best(nan_best, "logistic", "ctx_last") == {"layer": 0, "dev_auroc": 0.7}  # NaN is no AUROC
    with pytest.raises(ValueError, match=r"^no dev AUROC to choose a layer with \(dev needs both labels\); set "
                                         r"probe.layer instead$"):
        select_best(metrics.with_columns(pl.lit(None, pl.Float64).alias("auroc")), "logistic")
    with pytest.raises(ValueError, match="has no diffmean probe at ctx_last"):
        select_best(metrics, "diffmean", "ctx_last", forced_layer=1)


def test_sentence_scores_follow_threshold(tiny_cfg, run_paths):
    strong = {"train": 2.0, "dev": 2.0, "test": 2.0}
    write_case(run_paths, tiny_cfg, make_statements(), {0: strong, 2: strong})
    cfg = with_probe(tiny_cfg, threshold=0.3, select_kind="diffmean", kinds=["logistic"])
    run_probes(cfg, run_paths)
    scores = read_table(run_paths.table("sentence_scores"))
    sentences = read_table(run_paths.table("sentences"))
    assert scores.height == sentences.height  # every sentence, repeated keys included
    assert scores.select("item_id", "sent_idx").equals(sentences.select("item_id", "sent_idx"))
    assert scores["flagged"].to_list() == (scores["p_conflict"] > 0.3).to_list()
    assert 0 < scores["flagged"].sum() < scores.height
    best = json.loads((run_paths.probes / "best.json").read_text())
    assert set(scores["layer"]) == {best["layer"]} and set(scores["probe"]) == {"diffmean"}
    assert probe_path(run_paths, "diffmean", 0).exists()  # the select kind is trained even if not listed
    X = ActivationStore.open(run_paths.activations, cfg.model.name).vectors(best["layer"], sentences["key"].to_list())
    probe = LinearProbe.load(run_paths.probes / "final.safetensors")  # the chosen probe, refitted
    assert probe.meta["kind"] == "diffmean" and probe.meta["layer"] == best["layer"]
    np.testing.assert_array_equal(scores["p_conflict"].to_numpy(), probe.predict_proba(X))


def test_probes_train_on_train_split_only(tiny_cfg, run_paths):
    statements = make_statements()
    strengths = {0: {"train": 2.0, "dev": 2.0, "test": 2.0}}
    write_case(run_paths, tiny_cfg, statements, strengths, seed=0)
    run_probes(tiny_cfg, run_paths)
    first = {k: LinearProbe.load(probe_path(run_paths, k, 0)).weight for k in ("logistic", "diffmean")}

    # test labels flipped and test vectors redrawn; train and dev rows (which pick the L2) untouched
    held_out = (statements["split"] == "test").to_numpy()
    flipped = statements.with_columns(pl.Series("label", np.where(held_out, 1 - statements["label"].to_numpy(),
                                                                  statements["label"].to_numpy()), dtype=pl.Int8))
    write_parquet(flipped, run_paths.table("statements"), STATEMENTS)
    run_probes(tiny_cfg, run_paths)
    for kind, weight in first.items():
        np.testing.assert_array_equal(LinearProbe.load(probe_path(run_paths, kind, 0)).weight, weight)
    test_auroc = read_table(run_paths.table("probe_metrics")).filter(pl.col("split") == "test")["auroc"]
    assert (test_auroc < 0.2).all()  # the flipped test labels reached only the evaluation

    slug = model_slug(tiny_cfg.model.name)
    (path,) = ActivationStore.open(run_paths.activations, slug).layer_files(0)
    table = pq.read_table(path)
    vectors = table["vector"].combine_chunks().flatten().to_numpy().reshape(-1, DIM).copy()
    vectors[: statements.height][held_out] = np.random.default_rng(7).normal(size=(held_out.sum(), DIM))
    write_parquet(vectors_table(table["key"].to_pylist(), table["source"].to_pylist(), vectors), path,
                  activations_schema(DIM))
    run_probes(tiny_cfg, run_paths)
    for kind, weight in first.items():
        np.testing.assert_array_equal(LinearProbe.load(probe_path(run_paths, kind, 0)).weight, weight)


def test_check_splits_refuses_subject_leakage():
    statements = make_statements()
    leaky = statements.with_columns(pl.when(pl.col("stmt_id") == "test0").then(pl.lit("train-subject0"))
                                    .otherwise(pl.col("group")).alias("group"))
    check_splits(statements)
    with pytest.raises(ValueError, match="straddle"):
        check_splits(leaky)
    # five subjects, each with a statement in train and one in test: the message names the first three
    shared = {f"{split}{i}": f"g{i}" for split in ("train", "test") for i in range(5)}
    five = statements.with_columns(pl.col("stmt_id").replace_strict(shared, default=pl.col("group")).alias("group"))
    with pytest.raises(ValueError, match=r"^5 groups straddle splits \(e\.g\. \['g0', 'g1', 'g2'\]\): train/dev/test "
                                         r"would leak subjects$"):
        check_splits(five.sort("group"))
    with pytest.raises(ValueError, match="unknown splits"):
        check_splits(statements.with_columns(pl.lit("val").alias("split")))


def test_final_probe_refits_on_train_and_dev_never_test(tiny_cfg, run_paths):
    statements = make_statements()
    write_case(run_paths, tiny_cfg, statements, {0: {"train": 2.0, "dev": 2.0, "test": 2.0}}, seed=0)
    run_probes(tiny_cfg, run_paths)
    final = LinearProbe.load(run_paths.probes / "final.safetensors")
    best = json.loads((run_paths.probes / "best.json").read_text())
    assert best["fitted_on"] == ["train", "dev"] and best["l2"] in tiny_cfg.probe.l2_grid
    assert not np.array_equal(final.weight, LinearProbe.load(probe_path(run_paths, "logistic", 0)).weight)

    def flip(split: str) -> pl.DataFrame:
        sel = (statements["split"] == split).to_numpy()
        labels = statements["label"].to_numpy()
        return statements.with_columns(pl.Series("label", np.where(sel, 1 - labels, labels), dtype=pl.Int8))

    write_parquet(flip("test"), run_paths.table("statements"), STATEMENTS)
    run_probes(tiny_cfg, run_paths)
    np.testing.assert_array_equal(LinearProbe.load(run_paths.probes / "final.safetensors").weight, final.weight)
    write_parquet(flip("dev"), run_paths.table("statements"), STATEMENTS)
    run_probes(tiny_cfg, run_paths)
    assert not np.array_equal(LinearProbe.load(run_paths.probes / "final.safetensors").weight, final.weight)


def test_l2_is_chosen_on_dev_where_train_would_choose_otherwise():
    """Data where train and dev disagree: 40 train rows in 20 dimensions (3 informative) let the weak penalty
    (C = 1e3) fit train perfectly, while the strong one (C = 1e-4) ranks 400 dev rows better. The dev choice
    is the strong one; choosing on train AUROC (or on train+dev) picks the weak one and fails."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        X = rng.normal(size=(n, 20))
        X[:, :3] += 0.7 * (2 * y - 1)[:, None]
        return X, y

    (X_train, y_train), (X_dev, y_dev) = rows(40), rows(400)
    strong, weak = 1e-4, 1e3
    auroc = {(c, name): roc_auc_score(y_, fit_logistic(X_train, y_train, c).predict_proba(X_))
             for c in (strong, weak) for name, X_, y_ in (("train", X_train, y_train), ("dev", X_dev, y_dev))}
    assert auroc[weak, "train"] > auroc[strong, "train"] and auroc[strong, "dev"] > auroc[weak, "dev"] + 0.03
    X, y = np.vstack([X_train, X_dev]), np.concatenate([y_train, y_dev])
    split = np.array(["train"] * 40 + ["dev"] * 400)
    for grid in ([strong, weak], [weak, strong]):  # the grid's order does not matter
        probe, l2 = fit_on_dev("logistic", X, y, split, ProbeConfig(l2_grid=grid), 0)
        assert l2 == strong
        assert roc_auc_score(y_dev, probe.predict_proba(X_dev)) == pytest.approx(auroc[strong, "dev"])


def test_dev_can_choose_the_weaker_penalty_and_ties_go_to_the_stronger():
    """The mirror of the test above: the second feature is only noise the first one shares. A strong penalty keeps
    the probe near the mean-difference direction (the first feature, noisy); a weak one subtracts the shared noise.
    Dev prefers the weak one here. Where dev cannot tell the strengths apart (both separate it), the stronger wins."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        shared = 3 * rng.normal(size=n)
        return np.column_stack([0.5 * (2 * y - 1) + shared + 0.1 * rng.normal(size=n), shared]), y

    (X_train, y_train), (X_dev, y_dev) = rows(200), rows(200)
    strong, weak = 1e-4, 10.0
    dev = {c: roc_auc_score(y_dev, fit_logistic(X_train, y_train, c).predict_proba(X_dev)) for c in (strong, weak)}
    assert dev[weak] > dev[strong] + 0.2
    X, y, split = np.vstack([X_train, X_dev]), np.concatenate([y_train, y_dev]), np.array(["train", "dev"]).repeat(200)
    assert fit_on_dev("logistic", X, y, split, ProbeConfig(l2_grid=[strong, weak]), 0)[1] == weak
    separable = signal(np.arange(120) % 2, 20.0, rng)
    tie = np.array(["train", "dev"]).repeat(60)
    for grid in ([0.5, 2.0], [2.0, 0.5]):
        assert fit_on_dev("logistic", separable, np.arange(120) % 2, tie, ProbeConfig(l2_grid=grid), 0)[1] == 0.5


def test_a_kind_with_its_own_dev_selection_uses_it():
    """The mlp kind stops on dev AUROC (tasks/probes/kinds/mlp.py): fit_on_dev hands it train and dev as they are."""
    from tasks.probes.kinds.mlp import select_mlp

    rng = np.random.default_rng(5)
    y = np.arange(160) % 2
    X = signal(y, 1.0, rng)
    cfg = ProbeConfig(mlp_early_stop=2)
    probe, epochs = KINDS["mlp"].fit_on_dev(X[:100], y[:100], X[100:], y[100:], cfg, 3)
    again, epochs_again = select_mlp(X[:100], y[:100], X[100:], y[100:], cfg, 3)
    assert epochs == epochs_again
    np.testing.assert_array_equal(probe.predict_proba(X), again.predict_proba(X))


def test_relevant_mode_scores_only_relevant_sentences(tiny_cfg, run_paths):
    relevant = [i % 3 != 2 for i in range(12)]  # sent_idx 2 of every item left out (so one of the two sent-1 rows)
    write_case(run_paths, tiny_cfg, make_statements(), {0: {"train": 4.0, "dev": 4.0, "test": 4.0}},
               relevant=relevant)
    cfg = with_probe(tiny_cfg, threshold=0.01)  # a low threshold, so that most scored sentences are flagged
    cfg = cfg.model_copy(update={"decompose": cfg.decompose.model_copy(update={"relevance": True}),
                                 "activations": cfg.activations.model_copy(update={"sentences": "relevant"})})
    run_probes(cfg, run_paths)
    scores = read_table(run_paths.table("sentence_scores"))
    sentences = read_table(run_paths.table("sentences"))
    kept = sentences.filter(pl.col("is_relevant"))
    assert scores.select("item_id", "sent_idx").equals(kept.select("item_id", "sent_idx"))
    assert scores.height == 8 and scores["flagged"].sum() >= 6
    flagged = set(scores.filter(pl.col("flagged")).select("item_id", "sent_idx").iter_rows())
    marked = marked_contexts(run_paths)  # unscored sentences are never marked
    for item_id, group in sentences.group_by("item_id"):
        parts = [f"{OPEN} {text} {CLOSE}" if (item_id[0], idx) in flagged else text
                 for idx, text in group.sort("sent_idx").select("sent_idx", "text").iter_rows()]
        assert marked[item_id[0]] == " ".join(parts)
    assert all(not m.endswith(CLOSE) for m in marked.values())  # sent_idx 2 (not relevant) is never marked
    with pytest.raises(KeyError, match="no activation"):  # 'all' would need the left-out sentences too
        run_probes(tiny_cfg, run_paths)
