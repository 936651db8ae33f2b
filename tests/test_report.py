"""Report stage on a synthetic run directory: sections, best layer, valid PNGs and computed verdicts."""

from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest

from schemas.tables import COMPARISONS, ITEMS, METRICS, PREDICTIONS, PROBE_METRICS, SENTENCE_SCORES, SENTENCES
from tasks.report import run_report
from tasks.core.config import RunConfig
from tasks.core.storage import RunPaths, text_key, write_json, write_parquet
from tasks.evaluate.paired import comparisons

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ["closed_book", "full_context", "opinion_instruction", "probe_marking", "clear"]


def _metric_row(method: str, ps: float, half_width: float, n: int = 40, condition: str = "all",
                knowledge: str = "all") -> dict:
    row = {"method": method, "condition": condition, "knowledge": knowledge, "n": n, "n_counterfactual": n}
    for name, v in {"em": ps - 0.05, "f1": ps, "ps": ps, "po": 0.6 - ps / 2}.items():
        row |= {name: v, f"{name}_lo": max(v - half_width, 0.0), f"{name}_hi": min(v + half_width, 1.0)}
    mr = row["po"] / (row["ps"] + row["po"])
    return row | {"mr": mr, "mr_lo": max(mr - half_width, 0), "mr_hi": min(mr + half_width, 1)}


def _write_metrics(paths, ps: dict[str, float], half_width: float) -> None:
    write_parquet([_metric_row(m, ps[m], half_width) for m in METHODS], paths.table("metrics"), METRICS)


def _write_comparisons(paths: RunPaths) -> None:
    """The comparisons table of the run's predictions, as the evaluate stage writes it (default references)."""
    table = comparisons(pl.read_parquet(paths.table("predictions")), pl.read_parquet(paths.table("items")),
                        RunConfig().evaluate.references, 200, 0)
    write_parquet(table, paths.table("comparisons"), COMPARISONS)


@pytest.fixture()
def cfg(tmp_path) -> RunConfig:
    """The report loads no model: a default config under tmp is enough (no tiny model to build)."""
    return RunConfig(run="t", runs_dir=tmp_path / "runs")


@pytest.fixture()
def synthetic_run(cfg) -> RunPaths:
    paths = RunPaths(cfg.runs_dir / cfg.run)
    paths.root.mkdir(parents=True)
    return build_synthetic_run(paths)


def build_synthetic_run(run_paths: RunPaths) -> RunPaths:
    """Every table the report reads; layer 2 of the logistic probe is the best on dev."""
    items, sentences, scores, preds = [], [], [], []
    for i in range(6):
        split = "test" if i < 4 else "train"
        iid = f"q{i}"
        texts = [f"Fact {i} is in Rome.", f"Filler {i} is blue.", f"Other {i} is false."]
        items.append({"item_id": iid, "dataset": "synthetic", "split": split, "group": iid, "relation_id": "P1",
                      "question": f"Where is fact {i}?", "context": " ".join(texts), "answers": ["Rome"],
                      "orig_answers": ["Paris"], "orig_context": None, "target_sentence": texts[0],
                      "counterfactual": True})
        for j, t in enumerate(texts):
            label = ["conflict", "irrelevant", "irrelevant"][j]
            truthful = [False, True, False][j]
            # the false sentences score high, the true one low; the flag catches the conflict one only
            sentences.append({"item_id": iid, "sent_idx": j, "key": text_key(t), "text": t, "char_start": 0,
                              "char_end": len(t), "relevance": None, "label": label, "truthful": truthful})
            scores.append({"item_id": iid, "sent_idx": j, "key": text_key(t), "layer": 2, "probe": "logistic",
                           "p_conflict": [0.9, 0.2, 0.4][j], "flagged": j == 0})
        for m in METHODS:
            if split == "test":
                preds.append({"method": m, "item_id": iid, "prompt": "p", "prediction": "Rome", "em": 1.0,
                              "f1": 1.0, "ps": True, "po": False})
    probe_rows = []
    for layer in range(4):
        for probe in ("logistic", "diffmean"):
            for split in ("train", "dev", "test"):
                auroc = 0.9 if (layer == 2 and probe == "logistic") else 0.6 + 0.02 * layer
                probe_rows.append({"layer": layer, "probe": probe, "position": "last", "split": split, "n": 50,
                                   "accuracy": auroc - 0.1, "f1": auroc - 0.15,
                                   "auroc": auroc - (0.03 if split == "test" else 0.0)})
    write_parquet(items, run_paths.table("items"), ITEMS)
    write_parquet(sentences, run_paths.table("sentences"), SENTENCES)
    write_parquet(scores, run_paths.table("sentence_scores"), SENTENCE_SCORES)
    write_parquet(preds, run_paths.table("predictions"), PREDICTIONS)
    _write_comparisons(run_paths)
    write_parquet(probe_rows, run_paths.table("probe_metrics"), PROBE_METRICS)
    write_json({"layer": 2, "probe": "logistic", "l2": 0.01, "fitted_on": ["train", "dev"], "dev_auroc": 0.9,
                "test_auroc": 0.88, "test_accuracy": 0.81, "test_auroc_train_only": 0.87, "threshold": 0.5,
                "model": "tiny"}, run_paths.probes / "best.json")
    write_json({"clear": {"steps": 12, "ce_first": 3.5, "ce_last": 1.25, "target_modules": ["q_proj"]},
                "sft": {"steps": 12, "ce_first": 3.0, "ce_last": 1.5, "target_modules": ["q_proj"]}},
               run_paths.train_log)
    return run_paths


def test_report_sections_best_layer_and_pngs(cfg, synthetic_run):
    _write_metrics(synthetic_run, {"closed_book": 0.1, "full_context": 0.4, "opinion_instruction": 0.45,
                                   "probe_marking": 0.42, "clear": 0.7}, half_width=0.05)
    run_report(cfg, synthetic_run)
    text = synthetic_run.report.read_text()
    for heading in ("## What ran", "## Probe per layer", "## Conflict localisation on context sentences",
                    "## Method comparison"):
        assert heading in text
    assert f"model: `{cfg.model.name}`" in text
    assert "| test | 4 |" in text and "| train | 2 |" in text
    assert "**best layer 2** (logistic probe" in text
    assert "**test AUROC 0.880**, test accuracy 0.810" in text  # the refitted probe, from best.json
    assert "fitted on train alone, as in the table, test AUROC 0.870" in text
    assert "| logistic | last | **2** (best) |" in text
    assert text.count("(best)") == 1
    assert "|  | clear | sft |" in text and "| ce_last | 1.2500 | 1.5000 |" in text  # one column per arm
    assert "![Probe AUROC and accuracy per layer](figures/probe_layers.png)" in text
    assert "![Metrics per method with 95% CIs](figures/methods.png)" in text
    assert "| CLEAR | 40 | 65.0 [60.0, 70.0] | 70.0 [65.0, 75.0] | 70.0 [65.0, 75.0] |" in text
    assert "- **O&I (opinion + instruction)** (`opinion_instruction`): Zhou et al.'s reading instruction, then" in text
    assert "**q0**: Where is fact 0?" in text and "**q4**" not in text  # examples come from the evaluated split
    assert "| 0 | conflict | False | n/a | n/a | 0.900 | yes | Fact 0 is in Rome. |" in text
    for name in ("probe_layers", "methods"):
        data = (synthetic_run.figures / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert synthetic_run.report == synthetic_run.root / "report.md"


def test_localisation_numbers(cfg, synthetic_run):
    """Truth labels only (no relevance): the `not truthful` row by hand, the `conflicting` row said missing."""
    _write_metrics(synthetic_run, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    text = (run_report(cfg, synthetic_run), synthetic_run.report.read_text())[1]
    # 4 test items x 3 sentences; 2 false each (p 0.9 and 0.4), 1 true (p 0.2); only the first is flagged:
    # precision 4/4, recall 4/8, F1 2*4/(8+4), AUROC 1 (every false one above every true one)
    assert "| not truthful | 12 | 8 | 4 | 1.000 | 0.500 | 0.667 | 12 | 1.000 |" in text
    assert "| conflicting | 0 | 0 | 0 | n/a | n/a | n/a | 0 | n/a |" in text
    assert "**No `conflicting` labels**: none of the 12 test-split units has one" in text


def test_verdicts_come_from_the_paired_table_never_from_the_per_method_intervals(cfg, synthetic_run):
    """The metrics table claims disjoint per-method intervals (CLEAR 70% vs full context 40%), but every method
    answers every item alike: the paired verdict is "no measurable effect". Then CLEAR alone gives the context
    answer: p_s higher by 100 points, with McNemar's p over the 4 discordant items (2 / 2^4)."""
    _write_metrics(synthetic_run, {"closed_book": 0.1, "full_context": 0.4, "opinion_instruction": 0.45,
                                   "probe_marking": 0.42, "clear": 0.7}, half_width=0.05)
    run_report(cfg, synthetic_run)
    text = synthetic_run.report.read_text()
    assert "- **CLEAR vs full context** (n = 4): no measurable effect on p_s (+0.0 [+0.0, +0.0]);" in text
    assert "beats" not in text and "disjoint" not in text and "not distinguishable" not in text

    preds = pl.read_parquet(synthetic_run.table("predictions")).with_columns(
        ps=pl.col("method") == "clear", po=pl.col("method") != "clear")
    write_parquet(preds, synthetic_run.table("predictions"), PREDICTIONS)
    _write_comparisons(synthetic_run)
    run_report(cfg, synthetic_run)
    text = synthetic_run.report.read_text()
    assert ("- **CLEAR vs full context** (n = 4): p_s higher by 100.0 points [+100.0, +100.0], McNemar p = 0.125; "
            "no measurable effect on EM (+0.0 [+0.0, +0.0]); no measurable effect on F1 (+0.0 [+0.0, +0.0]); "
            "MR lower by 100.0 points [-100.0, -100.0].") in text
    assert "| CLEAR | 4 | 4 | +100.0 [+100.0, +100.0], p = 0.125 | +0.0 [+0.0, +0.0], p = 1.000 |" in text
    assert "- **Probe marking vs full context** (n = 4): no measurable effect on p_s (+0.0 [+0.0, +0.0])" in text


def test_report_names_the_skipped_reference_and_an_old_run_without_the_table(cfg, synthetic_run):
    from tasks.evaluate.methods import method_label

    _write_metrics(synthetic_run, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    run_report(cfg, synthetic_run)
    text = synthetic_run.report.read_text()
    named = f"{method_label('sft')} (`sft`)" if method_label("sft") != "sft" else "`sft`"
    assert f"Skipped references (not evaluated in this run): {named}." in text
    assert "### Against full context" in text
    synthetic_run.table("comparisons").unlink()
    run_report(cfg, synthetic_run)
    assert "No `comparisons` table: the run's evaluate stage predates it" in synthetic_run.report.read_text()


def test_manifest_config_is_reported_and_probe_stage_optional(cfg, synthetic_run):
    _write_metrics(synthetic_run, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    recorded = cfg.model_copy(update={"seed": 1234, "dataset": "confiqa-qa"}).model_dump(mode="json")
    synthetic_run.manifest.write_text(json.dumps({"config": recorded}))
    synthetic_run.table("probe_metrics").unlink()
    run_report(cfg, synthetic_run)
    text = synthetic_run.report.read_text()
    assert "- seed: 1234" in text and "dataset: `confiqa-qa`" in text
    assert "the probes stage did not run" in text
    assert not (synthetic_run.figures / "probe_layers.png").exists()
    assert (synthetic_run.figures / "methods.png").exists()


def test_labels_come_from_the_method_registry(monkeypatch):
    from tasks.evaluate.methods import REGISTRY
    from tasks.report import label, method_legend

    assert [label(m) for m in METHODS] == ["closed book", "full context", "O&I (opinion + instruction)", "probe marking",
                                           "CLEAR"]
    monkeypatch.setitem(REGISTRY, "clear", dataclasses.replace(REGISTRY["clear"], label="C"))
    assert label("clear") == "C" and label("retired_method") == "retired_method"  # an old run's unregistered name
    assert method_legend(["retired_method", "clear"]).splitlines() == [
        "- **retired_method** (`retired_method`)", f"- **C** (`clear`): {REGISTRY['clear'].description}"]


def test_report_per_condition_and_knowledge_with_paired_statement(cfg, synthetic_run):
    """Subset rows become one table per condition (lexical copy's rows included), the headline MR is MR on known
    items, and the paired statement names the subsets without a measurable CLEAR vs full-context difference."""
    methods = [*METHODS, "lexical_copy"]
    rows = [_metric_row(m, 0.5, 0.1) for m in methods]
    rows += [_metric_row(m, 0.3, 0.1, n=3, knowledge="known") | {"mr": 0.25, "mr_lo": 0.125, "mr_hi": 0.375}
             for m in methods]
    rows += [_metric_row(m, 0.5, 0.1, n=1, knowledge="unknown") for m in methods]
    rows += [_metric_row(m, 0.5, 0.1, n=2, condition="counterfactual", knowledge=k) for m in methods
             for k in ("all", "known")]
    write_parquet(rows, synthetic_run.table("metrics"), METRICS)
    items = pl.read_parquet(synthetic_run.table("items")).with_columns(
        condition=pl.when(pl.col("item_id").is_in(["q0", "q1"])).then(pl.lit("counterfactual")))
    write_parquet(items, synthetic_run.table("items"), ITEMS)
    # CLEAR gives the context answer on every test item, full context on none; the rest answer as before
    preds = pl.read_parquet(synthetic_run.table("predictions")).with_columns(
        ps=pl.when(pl.col("method") == "full_context").then(False).otherwise(pl.col("ps")),
        known=pl.col("item_id") != "q3")
    write_parquet(preds, synthetic_run.table("predictions"), PREDICTIONS)
    _write_comparisons(synthetic_run)
    run_report(cfg, synthetic_run)
    text = synthetic_run.report.read_text()
    assert "## Methods per condition and per knowledge" in text
    assert "### Condition: all" in text and "### Condition: counterfactual" in text
    assert "| lexical copy | 40 |" in text  # the overall table
    assert "| lexical copy | known | 3 | 25.0 [15.0, 35.0] |" in text
    assert "| CLEAR | all | 2 |" in text and "| CLEAR | unknown | 1 |" in text
    assert "**Headline MR, on known items**" in text and "CLEAR 25.0 [12.5, 37.5] (n = 3)" in text
    # 4 test items, CLEAR right on all and full context on none: the paired difference is +100 points everywhere;
    # McNemar's p is 2 / 2^k over the k discordant items
    assert "| CLEAR | 4 | 4 | +100.0 [+100.0, +100.0], p = 0.125 |" in text
    assert ("| counterfactual | known | CLEAR | 2 | 2 | +100.0 [+100.0, +100.0], p = 0.500 | +0.0 [+0.0, +0.0], "
            "p = 1.000 | +0.0 [+0.0, +0.0] | n/a |") in text  # full context states neither answer: MR undefined
    assert text.index("## Paired comparisons\n") < text.index("## Methods per condition and per knowledge") < \
        text.index("## Paired comparisons per condition and knowledge")  # overall first, subsets after
    assert ("paired per-item difference: a measurable difference on every subset: all/all (p_s), all/known (p_s), "
            "all/unknown (p_s), counterfactual/all (p_s), counterfactual/known (p_s).") in text


def test_report_of_identical_methods_says_no_measurable_effect(cfg, synthetic_run):
    _write_metrics(synthetic_run, dict.fromkeys(METHODS, 0.5), half_width=0.1)
    run_report(cfg, synthetic_run)
    text = synthetic_run.report.read_text()
    assert "- **CLEAR vs full context** (n = 4): no measurable effect on p_s (+0.0 [+0.0, +0.0])" in text
    assert "## Paired comparisons per condition and knowledge" not in text  # no subsets to pair on
    assert "No subsets: the items carry no condition and none is known or unknown." in text
    assert "Headline MR (known items): not available" in text
