"""Probe kinds: the reference's MLP (architecture, seed, early stopping, save/load), the one loader that refuses
a probe of another width for every kind, and mlp rows per layer through the probes stage."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tasks.core.activation_store import ActivationStore
from tasks.core.config import ProbeConfig
from tasks.core.storage import RunPaths, model_slug, read_table
from tasks.probes.crossfit import FoldPlan, fit_fold_probes
from tasks.probes.kinds import KINDS, load_probe
from tasks.probes.kinds.mlp import MLPProbe, _net, fit_mlp, select_mlp, train_mlp
from tasks.probes.selection import split_metrics
from tasks.probes.stage import probe_path, run_probes
from tasks.report import section_probes
from tests.test_probes import DIM, make_statements, with_probe, write_case


def separable(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points labelled by the side of the hyperplane x0 + x1 = 0, none within 0.5 of it (a margin), offset from 0."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4 * n, d)).astype(np.float32)
    X = X[np.abs(X[:, 0] + X[:, 1]) > 0.5][:n]
    return X + 2.0, (X[:, 0] + X[:, 1] > 0).astype(int)


def same_tensors(a: MLPProbe, b: MLPProbe) -> bool:
    return all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_mlp_separates_a_linearly_separable_set():
    X, y = separable(300, 8, seed=0)
    probe = fit_mlp(X[:200], y[:200], 30, seed=0)
    assert roc_auc_score(y[200:], probe.predict_proba(X[200:])) == 1.0  # held-out points


def test_mlp_parameter_count_is_the_reference_architecture():
    d = 16
    by_hand = 16 * 512 + 512 + 512 * 256 + 256 + 256 + 1  # Linear(d,512), Linear(512,256), Linear(256,1)
    assert sum(p.numel() for p in _net(d, 0).parameters()) == by_hand
    X, y = separable(64, d, seed=1)
    probe = fit_mlp(X, y, 1, seed=0)
    weights = {k: v for k, v in probe.tensors.items() if k not in ("mean", "scale")}  # the scaler is not trained
    assert sum(v.size for v in weights.values()) == by_hand
    assert probe.tensors["mean"].shape == probe.tensors["scale"].shape == (d,) and probe.dim == d


def test_mlp_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    X, y = separable(120, 8, seed=2)
    state = torch.get_rng_state()
    a, b, other = fit_mlp(X, y, 3, seed=5), fit_mlp(X, y, 3, seed=5), fit_mlp(X, y, 3, seed=6)
    assert torch.equal(state, torch.get_rng_state())
    assert same_tensors(a, b)
    assert not np.array_equal(a.tensors["w1"], other.tensors["w1"])
    assert not np.array_equal(a.predict_proba(X), other.predict_proba(X))


def test_early_stopping_stops_once_dev_auroc_saturates():
    X, y = separable(360, 8, seed=3)
    dev = (X[240:], y[240:])
    probe, epochs, curve = train_mlp(X[:240], y[:240], 100, seed=0, dev=dev, patience=3)
    assert curve[epochs - 1] == max(curve) == 1.0  # dev AUROC reached its ceiling ...
    assert len(curve) == epochs + 3 < 100  # ... and training stopped 3 epochs later, not at epoch 100
    assert same_tensors(probe, fit_mlp(X[:240], y[:240], epochs, seed=0))  # the kept epoch is what a refit trains
    chosen, strength = select_mlp(X[:240], y[:240], *dev, ProbeConfig(mlp_epochs=100, mlp_early_stop=3), 0)
    assert strength == float(epochs) and same_tensors(chosen, probe)

    off, n_off, curve_off = train_mlp(X[:240], y[:240], 4, seed=0, dev=dev, patience=0)  # off: the fixed schedule
    assert n_off == 4 and curve_off == [] and same_tensors(off, fit_mlp(X[:240], y[:240], 4, seed=0))
    with pytest.raises(ValueError, match="number of epochs"):
        fit_mlp(X, y, 2.5, seed=0)


def test_mlp_save_load_round_trip(tmp_path):
    X, y = separable(100, 8, seed=4)
    probe = fit_mlp(X, y, 2, seed=0)
    probe.meta = {"kind": "mlp", "layer": 3, "l2": 2.0}
    path = probe.save(tmp_path / "mlp-layer3.safetensors")
    again = MLPProbe.load(path)
    assert same_tensors(probe, again) and again.meta == probe.meta
    np.testing.assert_array_equal(again.predict_proba(X), probe.predict_proba(X))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_load_probe_refuses_another_width_in_one_line(tmp_path, kind):
    X, y = separable(80, 8, seed=5)
    probe = KINDS[kind].fit(X, y, 1.0, 0)
    probe.meta = {"kind": kind, "layer": 0}
    path = probe.save(tmp_path / "runs" / "r1" / "probes" / f"{kind}-layer0.safetensors")
    np.testing.assert_array_equal(load_probe(path, 8).predict_proba(X), probe.predict_proba(X))

    with pytest.raises(ValueError) as err:
        load_probe(path, 12, "layer 0's activations")
    line = str(err.value)
    assert "\n" not in line and str(path) in line
    assert "8-dim" in line and "layer 0's activations are 12-dim" in line
    assert f"clearflow stage probes --run r1 --runs-dir {tmp_path / 'runs'}" in line


def test_load_probe_refuses_a_damaged_file_in_one_line(tmp_path):
    X, y = separable(80, 8, seed=6)
    probe = fit_mlp(X, y, 1, seed=0)
    probe.meta = {"kind": "mlp"}
    path = probe.save(tmp_path / "probes" / "mlp-layer0.safetensors")
    path.with_suffix(".json").write_text(json.dumps({"kind": "logistic"}))  # an mlp file that says it is logistic
    with pytest.raises(ValueError, match=r"not a readable probe \(KeyError: 'weight'\); write a matching one with"):
        load_probe(path, 8)
    path.with_suffix(".json").write_text(json.dumps({"kind": "lda"}))
    with pytest.raises(ValueError, match=r"unknown probe kind 'lda'"):
        load_probe(path, 8)
    path.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match=r"mlp-layer0.safetensors: not a readable probe \(FileNotFoundError"):
        load_probe(path, 8)


def test_mlp_rows_for_every_layer_through_the_probes_stage(tiny_cfg, run_paths: RunPaths):
    statements = make_statements()
    strong = {"train": 4.0, "dev": 4.0, "test": 4.0}
    layers = [0, 1, 2]
    write_case(run_paths, tiny_cfg, statements, {layer: strong for layer in layers})
    cfg = with_probe(tiny_cfg, kinds=["logistic", "diffmean", "mlp"], select_kind="mlp", mlp_epochs=20,
                     mlp_early_stop=2)
    run_probes(cfg, run_paths)

    metrics = read_table(run_paths.table("probe_metrics"))
    mlp = metrics.filter(pl.col("probe") == "mlp")
    assert sorted(mlp.select("layer", "split").iter_rows()) == [(la, s) for la in layers
                                                                for s in ("dev", "test", "train")]
    assert (mlp.filter(pl.col("split") == "test")["auroc"] > 0.95).all()
    table = section_probes(metrics, json.loads(run_paths.best_probe.read_text()))
    for layer in layers:  # the report's per-layer table has an mlp row for every layer
        assert f"| mlp | last | {layer} |" in table or f"| mlp | last | **{layer}** (best) |" in table

    store = ActivationStore.open(run_paths.activations, model_slug(cfg.model.name))
    X = store.vectors(1, statements["key"].to_list())
    saved = load_probe(probe_path(run_paths, "mlp", 1), store.dim, "layer 1's activations")
    test = (statements["split"] == "test").to_numpy()
    assert saved.meta["seed"] == cfg.seed and 1 <= saved.meta["l2"] <= 20 and saved.dim == DIM
    assert split_metrics(saved.predict_proba(X[test]), statements["label"].to_numpy()[test], 0.5) == \
        saved.meta["metrics"]["test"]  # the reloaded probe reproduces its recorded test metrics

    best = json.loads(run_paths.best_probe.read_text())  # the mlp flags: refitted on train+dev for dev's epochs
    final = load_probe(run_paths.probes / "final.safetensors", store.dim)
    assert best["probe"] == "mlp" and final.meta["fitted_on"] == ["train", "dev"] and final.meta["l2"] == best["l2"]
    assert f"mlp probe at position `last`, epochs={best['l2']}" in section_probes(metrics, best)
    scores = read_table(run_paths.table("sentence_scores"))
    U = store.vectors(best["layer"], scores["key"].to_list())
    np.testing.assert_array_equal(scores["p_conflict"].to_numpy(), final.predict_proba(U))


def test_mlp_fold_probes_reuse_the_chosen_epochs_and_seed():
    statements = make_statements()
    X, y = separable(statements.height, 8, seed=7)
    chosen = fit_mlp(X, y, 3, seed=4)
    chosen.meta = {"kind": "mlp", "layer": 0, "l2": 3.0, "seed": 4, "fitted_on": ["train", "dev"]}
    fold = np.arange(statements.height) % 2
    folds = fit_fold_probes(chosen, X, y, statements, FoldPlan(fold, np.array([0, 1])))
    pool = statements["split"].is_in(["train", "dev"]).to_numpy()
    for k, probe in folds.items():
        assert probe.meta["seed"] == 4 and probe.meta["l2"] == 3.0
        assert same_tensors(probe, fit_mlp(X[pool & (fold != k)], y[pool & (fold != k)], 3, seed=4))


def test_diffmean_on_paired_identical_vectors_is_a_chance_probe_not_an_error(tmp_path):
    """At a subject's last token a causal model has not read the object: each true/false pair has one vector. The
    difference of means is then zero; the probe says the train base rate for every row (chance), and reloads."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 8)).astype(np.float32)
    X, y = np.concatenate([base, base, base]), np.array([0] * 10 + [1] * 10 + [0] * 10)  # same mean per label
    probe = KINDS["diffmean"].fit(X, y, 1.0, 0)
    np.testing.assert_allclose(probe.predict_proba(rng.normal(size=(4, 8))), 1 / 3, rtol=0, atol=1e-6)
    reloaded = KINDS["diffmean"].load(probe.save(tmp_path / "p.safetensors"))
    np.testing.assert_array_equal(reloaded.predict_proba(base), probe.predict_proba(base))
    moved = X + np.where(y[:, None] == 1, 0.5, 0.0)  # a real difference: a direction again, along the shift
    shifted = KINDS["diffmean"].fit(moved, y, 1.0, 0)
    np.testing.assert_allclose(shifted.weight / np.linalg.norm(shifted.weight), np.full(8, 8 ** -0.5), rtol=1e-5)
