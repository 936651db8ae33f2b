"""`clearflow transfer`: a run's saved probes scored on another source's statements (tasks/probes/transfer.py)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.cli import main
from flows.runner import start_manifest
from flows.stages import STAGES
from flows.transfer import target_config
from schemas.layout import analysis_path
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths, read_table
from tasks.probes.transfer import run_transfer, unseen
from tests.format_fixtures import write_mquake


def make_run(cfg: RunConfig, stages: tuple[str, ...]) -> RunPaths:
    """The given stages of a run, called directly (no Prefect), and the manifest header the transfer reads."""
    paths = RunPaths(cfg.runs_dir / cfg.run)
    paths.root.mkdir(parents=True, exist_ok=True)
    for name in stages:
        STAGES[name].function()(STAGES[name].view(cfg), paths)
    start_manifest(cfg, paths)
    return paths


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Run a: probes on 60 known facts; run b: the statements of a small MQuAKE file, extracted with a's options."""
    runs_dir = tmp_path_factory.mktemp("runs")
    mquake = write_mquake(tmp_path_factory.mktemp("data"))
    cfg_a = RunConfig.model_validate({"run": "a", "runs_dir": str(runs_dir), "limit": 60, "model": {"name": tiny_model},
                                      "activations": {"layers": [1, 3]}})
    a = make_run(cfg_a, ("ingest", "decompose", "activations", "probes"))
    cfg_b = target_config(cfg_a.model_dump(mode="json"), {"dataset": "mquake", "data_path": str(mquake)}, "b", runs_dir)
    b = make_run(cfg_b, ("ingest", "decompose", "activations"))
    return {"a": a, "b": b, "runs_dir": runs_dir, "mquake": mquake, "model": tiny_model}


def plain_states(model_dir: str, texts: list[str]) -> dict[int, np.ndarray]:
    """Independent route: each text fed alone to the HF model, hidden_states[L + 1] at its last token."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out: dict[int, list[np.ndarray]] = {}
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            for layer in range(len(hidden) - 1):
                out.setdefault(layer, []).append(hidden[layer + 1][0, -1].numpy())
    return {layer: np.stack(v).astype(np.float64) for layer, v in out.items()}


def test_transfer_auroc_equals_sklearn_on_scores_from_a_plain_forward_pass(runs):
    rows = run_transfer(runs["a"], runs["b"])
    statements = read_table(runs["b"].table("statements"))
    y = statements["label"].to_numpy()
    states = plain_states(runs["model"], [t.rstrip().rstrip(".!?") for t in statements["text"].to_list()])
    own = read_table(runs["a"].table("probe_metrics")).filter(pl.col("split") == "test")
    checked = 0
    for name in ("logistic-layer1", "logistic-layer3", "diffmean-layer1", "diffmean-layer3", "final"):
        tensors = load_file(str(runs["a"].probes / f"{name}.safetensors"))
        meta = json.loads((runs["a"].probes / f"{name}.json").read_text())
        p = 1 / (1 + np.exp(-(states[meta["layer"]] @ tensors["weight"].astype(np.float64) + float(tensors["bias"]))))
        row = rows.filter((pl.col("probe_file") == f"{name}.safetensors") & (pl.col("subset") == "all")).row(0, named=True)
        assert row["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12), name
        assert row["accuracy"] == pytest.approx(float(np.mean((p > meta["threshold"]) == y)), abs=1e-12), name
        assert (row["n"], row["n_conflict"], row["target_run"]) == (len(y), int(y.sum()), "b")
        assert row["fitted_on"] == ("train+dev" if name == "final" else "train")
        if name != "final":  # the probe's own test AUROC, as the probes stage recorded it
            own_row = own.filter((pl.col("probe") == meta["kind"]) & (pl.col("layer") == meta["layer"]))
            assert row["source_test_auroc"] == pytest.approx(own_row["auroc"][0], abs=1e-12)
        checked += 1
    assert checked == 5 and rows["target_dataset"].unique().to_list() == ["mquake"]
    assert set(rows["probe_file"]) == {f"{k}-layer{layer}.safetensors" for k in ("logistic", "diffmean")
                                       for layer in (1, 3)} | {"final.safetensors"}  # fold probes are not transferred


def test_unseen_subset_drops_the_subjects_and_texts_the_probe_was_fitted_on():
    source = pl.DataFrame({"key": ["k1", "k2", "k3"], "group": ["Paris", "Rome", "Oslo"],
                           "split": ["train", "dev", "test"]})
    target = pl.DataFrame({"key": ["x1", "x2", "x3", "k3", "k1"], "group": ["PARIS", "Rome", "Lima", "Lima", "Lima"]})
    assert unseen(target, source, ("train",)).tolist() == [False, True, True, True, False]
    assert unseen(target, source, ("train", "dev")).tolist() == [False, False, True, True, False]


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]  # the error: one line (log lines of the run may come before it)


def test_missing_statements_or_activations_are_one_line_errors(runs, capsys):
    base = ["--runs-dir", str(runs["runs_dir"])]
    cfg_c = target_config(json.loads(runs["a"].manifest.read_text())["config"],
                          {"dataset": "mquake", "data_path": str(runs["mquake"])}, "c", runs["runs_dir"])
    make_run(cfg_c, ("ingest",))  # statements, no activations
    err = one_line_error(capsys, ["transfer", "--run", "a", "--statements-run", "c", *base])
    assert err.startswith(f"clearflow: error: run 'c' has no activations of model {runs['model']}")
    assert "clearflow transfer --run SOURCE --statements-run c --dataset NAME" in err
    err = one_line_error(capsys, ["transfer", "--run", "a", "--statements-run", "nowhere", *base])
    assert err.startswith("clearflow: error: run 'nowhere' has no statements")
    err = one_line_error(capsys, ["transfer", "--run", "nowhere", "--statements-run", "b", *base])
    assert err.startswith("clearflow: error: no run 'nowhere'")
    err = one_line_error(capsys, ["transfer", "--run", "a", "--statements-run", "b", "--limit", "5", *base])
    assert "give --dataset NAME with them" in err
    err = one_line_error(capsys, ["transfer", "--run", "a", "--statements-run", "a", *base])
    assert "the probes' own run" in err


def test_a_probe_of_another_width_is_refused_in_one_line_naming_the_file(runs, tmp_path):
    """The width check is the probe kinds' own (`load_probe`): a probe reading other states names itself, both
    widths and the command that rewrites it, before any statement is scored."""
    import shutil

    from tasks.probes.kinds import KINDS

    copy = RunPaths(tmp_path / "runs" / "a2")
    shutil.copytree(runs["a"].root, copy.root)
    rng = np.random.default_rng(0)
    wrong = KINDS["logistic"].fit(rng.normal(size=(40, 5)), np.arange(40) % 2, 1.0, 0)
    wrong.meta = {"kind": "logistic", "layer": 1}
    victim = sorted(copy.probes.glob("logistic-*.safetensors"))[0]
    wrong.save(victim)  # a 5-wide probe where a 64-wide one was
    with pytest.raises(ValueError) as err:
        run_transfer(copy, runs["b"])
    line = str(err.value)
    assert "\n" not in line and str(victim) in line and "5-dim" in line
    assert f"run 'b''s states of {runs['model']} are 64-dim" in line
    assert f"clearflow stage probes --run a2 --runs-dir {tmp_path / 'runs'}" in line


def test_one_command_makes_the_other_source_and_the_catalog_queries_the_table(runs, prefect_harness, capsys):
    from tasks.catalog.views import query

    runs_dir = runs["runs_dir"]
    argv = ["transfer", "--run", "a", "--statements-run", "mq", "--dataset", "mquake", "--data-path",
            str(runs["mquake"]), "--runs-dir", str(runs_dir)]
    main(argv)
    out = capsys.readouterr().out
    assert "transfer table:" in out and "logistic layer " in out and "final probe (logistic layer" in out
    mq = RunPaths(runs_dir / "mq")
    meta = [json.loads(next(r.activations.glob("model=*/meta.json")).read_text()) for r in (runs["b"], mq)]
    assert meta[0]["store_key"] == meta[1]["store_key"]  # the same statements and options: the same stored states
    expected = run_transfer(runs["a"], runs["b"]).sort("probe_file", "subset")
    main(argv[:5] + argv[-2:])  # again, on the run made above: its rows are replaced, not added
    columns, got = query("select probe_file, subset, auroc from probe_transfer where target_run = 'mq'"
                         " order by probe_file, subset", runs_dir, run="a")
    assert columns == ["probe_file", "subset", "auroc"]
    assert got == list(expected.select("probe_file", "subset", "auroc").iter_rows())
    table = read_table(analysis_path(runs["a"].root, "probe_transfer"))
    assert table.filter(pl.col("target_run") == "mq").height == expected.height
    from tasks.probes.analyses_report import section_analyses  # the run's report shows each target's summary
    from tasks.probes.transfer import transfer_summary

    section = section_analyses(runs["a"])
    assert "On run `mq` (mquake):" in section
    assert all(f"- {line}" in section for line in transfer_summary(runs["a"], expected).splitlines())
    kinds = sorted(expected["probe"].unique().to_list())
    assert "| layer | " + " | ".join(f"{k} {s}" for k in kinds for s in ("all", "unseen")) + " |" in section
    at_layer_3 = {(r["probe"], r["subset"]): r["auroc"] for r in expected.filter(
        (pl.col("layer") == 3) & (pl.col("fitted_on") == "train")).iter_rows(named=True)}
    cells = ["n/a" if at_layer_3.get((k, s)) is None else f"{at_layer_3[(k, s)]:.3f}"
             for k in kinds for s in ("all", "unseen")]
    assert "| 3 | " + " | ".join(cells) + " |" in section
