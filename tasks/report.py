"""Report stage: report.md and its figures, every number computed from the run's tables (none typed in)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from pydantic import ValidationError

from tasks.core.config import ConfigView, RunConfig
from tasks.core.figures import save_figure
from tasks.core.marking import relevance_filtered
from tasks.core.markdown import fmt, md_table, missing
from tasks.core.storage import RunPaths, atomic_path, read_optional_table, read_table
from tasks.evaluate.comparison import (
    METRIC_LABELS, headline_mr, metric_cells, overall, section_paired, section_paired_subsets, section_subsets,
    with_subset_columns,
)
from tasks.evaluate.methods import REGISTRY as METHODS
from tasks.evaluate.methods import method_label as label
from tasks.insideout.reporting import FIGURE as INSIDEOUT_FIGURE
from tasks.insideout.reporting import plot_insideout, section_insideout
from tasks.probes.analyses_report import section_analyses
from tasks.probes.crossfit import marker_line
from tasks.probes.kinds import strength_text
from tasks.probes.localisation import LABELS, localisation_by_target, localisation_units
from tasks.probes.localisation_report import layer_localisation_figure, section_layer_localisation
from tasks.trace import write_trace_page

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

N_EXAMPLES = 3


# ---------------------------------------------------------------- inputs


def _optional_json(path: Path) -> Any:
    """A JSON file a report can do without."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def run_config(cfg: RunConfig | ConfigView, paths: RunPaths) -> RunConfig | ConfigView:
    """The configuration the run recorded in its manifest (what actually ran), else the one given; a view stays a
    view of the same sections, so the manifest is no way around the stage's declaration."""
    manifest = _optional_json(paths.manifest)
    if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
        try:
            recorded = RunConfig.model_validate(manifest["config"])
            return cfg.over(recorded) if isinstance(cfg, ConfigView) else recorded
        except ValidationError as err:
            log.warning("manifest config unreadable (%s); reporting with the given config", err.errors()[0]["msg"])
    return cfg


# ---------------------------------------------------------------- labels


def method_legend(methods: list[str]) -> str:
    """One line per evaluated method: its label, its name in the tables, what the model sees."""
    return "\n".join(f"- **{label(m)}** (`{m}`)" + (f": {METHODS[m].description}" if m in METHODS else "")
                     for m in methods)


# ---------------------------------------------------------------- sections


def _log_cell(value: Any) -> Any:
    """A train-log value as the report shows it (floats to 4 decimals)."""
    return fmt(value, 4) if isinstance(value, float) else value


def section_what_ran(conf: RunConfig, items: pl.DataFrame, metrics: pl.DataFrame, train_log: Any) -> str:
    """Model, data, seed and sizes, so a reader knows what the numbers are about."""
    counts = items.group_by("split").len().sort("split")
    lines = [
        "## What ran",
        f"- model: `{conf.model.name}` (dtype {conf.model.dtype})",
        f"- dataset: `{conf.dataset}`" + (f" (limit {conf.limit})" if conf.limit else ""),
        f"- seed: {conf.seed}",
        f"- evaluated split: `{conf.evaluate.split}`; methods: {', '.join(label(m) for m in metrics['method'])}",
        f"- greedy decoding, at most {conf.evaluate.max_new_tokens} new tokens; "
        f"{conf.evaluate.bootstrap} bootstrap resamples for the 95% CIs",
        "",
        md_table(["split", "items"], [[s, n] for s, n in counts.iter_rows()]),
    ]
    arms = [a for a, v in train_log.items() if isinstance(v, dict)] if isinstance(train_log, dict) else []
    if arms:  # one column per fine-tuning arm, one row per scalar of its log
        keys = [k for k, v in train_log[arms[0]].items() if isinstance(v, (int, float, str, bool)) or v is None]
        rows = [[k, *(_log_cell(train_log[a].get(k)) for a in arms)] for k in keys]
        lines += ["", "Fine-tuning arms (`adapters/train_log.json`):", "", md_table(["", *arms], rows)]
    return "\n".join(lines)


def with_position(probe_metrics: pl.DataFrame) -> pl.DataFrame:
    """probe_metrics with its position column (a table from before positions read `last` only)."""
    if "position" in probe_metrics.columns:
        return probe_metrics
    return probe_metrics.with_columns(pl.lit("last").alias("position"))


def probe_rows(probe_metrics: pl.DataFrame) -> pl.DataFrame:
    """One row per (probe, position, layer) with dev/test AUROC and accuracy side by side."""
    wide, on = None, ["probe", "position", "layer"]
    for split in ("dev", "test"):
        part = with_position(probe_metrics).filter(pl.col("split") == split).select(
            *on, pl.col("auroc").alias(f"{split}_auroc"), pl.col("accuracy").alias(f"{split}_acc")
        )
        wide = part if wide is None else wide.join(part, on=on, how="full", coalesce=True)
    return wide.sort("probe", "position", "layer")


def _is_best(r: dict, best: dict | None) -> bool:
    """Whether a (probe, position, layer) row is the probe that flags sentences."""
    return best is not None and (r["probe"], r["position"], r["layer"]) == (
        best["probe"], best.get("position", "last"), best["layer"])


def best_summary(probe_metrics: pl.DataFrame, best: dict) -> str:
    """'best layer L (probe at position): test AUROC x' for the probe that flags sentences, as best.json records it."""
    at = {"probe": best["probe"], "position": best.get("position", "last"), "layer": best["layer"]}
    rows = probe_rows(probe_metrics).filter(**at)
    r = rows.row(0, named=True) if rows.height else {}
    fitted = best.get("fitted_on", ["train"])
    refit = list(fitted) == ["train", "dev"]
    strength = strength_text(best["probe"], best.get("l2", "n/a"))
    line = (
        f"**best layer {best['layer']}** ({best['probe']} probe at position `{best.get('position', 'last')}`, "
        f"{strength}, chosen on "
        f"dev AUROC {fmt(best.get('dev_auroc', r.get('dev_auroc')))}): **test AUROC {fmt(best.get('test_auroc'))}**, "
        f"test accuracy {fmt(best.get('test_accuracy'))} on subjects never seen in training"
    )
    if refit:
        line += (f" (refitted on train+dev once layer and C were fixed; fitted on train alone, as in the table, "
                 f"test AUROC {fmt(best.get('test_auroc_train_only', r.get('test_auroc')))})")
    return line + f"; sentences flagged at p_conflict > {best.get('threshold', 'n/a')}. " + marker_line(best)


def section_probes(probe_metrics: pl.DataFrame | None, best: dict | None) -> str:
    """Per-layer probe quality on held-out statements, best layer marked."""
    if probe_metrics is None:
        return "## Probe per layer\n\nNo `probes/metrics.parquet`: the probes stage did not run."
    wide = probe_rows(probe_metrics)
    rows = []
    for r in wide.iter_rows(named=True):
        rows.append([r["probe"], r["position"], f"**{r['layer']}** (best)" if _is_best(r, best) else r["layer"],
                     fmt(r["dev_auroc"]), fmt(r["dev_acc"]), fmt(r["test_auroc"]), fmt(r["test_acc"])])
    parts = ["## Probe per layer",
             "Conflicting (false) vs aligned (true) statements; in the table every probe is fitted on train, its"
             " hyper-parameter (logistic: L2 strength C from the grid; mlp: epochs, early-stopped on dev when asked;"
             " diffmean: none) and the layer chosen on dev. Position `last`: the statements, each fed alone; `ctx_last` /"
             " `ctx_mean`: the context units with a truth label, read in their context (split by item)."]
    if best is not None:
        parts.append(best_summary(probe_metrics, best))
    parts += [md_table(["probe", "position", "layer", "dev AUROC", "dev acc", "test AUROC", "test acc"], rows),
              "![Probe AUROC and accuracy per layer](figures/probe_layers.png)"]
    return "\n\n".join(parts)


LOCALISATION_SPLIT = "test"  # the flagging probe is refitted on train+dev: test is the split it never saw


def _yes_no(value: Any) -> str:
    """A nullable flag for a table cell: 'n/a' when the label is unknown."""
    return "n/a" if value is None else str(value)


def localisation_table(units: pl.DataFrame) -> str:
    """The flags and p_conflict against each target on the test split, with counts; missing labels said plainly."""
    test = units.filter(pl.col("split") == LOCALISATION_SPLIT)
    stats = localisation_by_target(test)
    rows = [[name, s["n"], s["positives"], s["flagged"], fmt(s["precision"]), fmt(s["recall"]), fmt(s["f1"]),
             s["n_scored"], fmt(s["auroc"])] for name, s in stats.items()]
    parts = [md_table(["against", "labelled units", "positive", "flagged", "precision", "recall", "F1", "scored",
                       "AUROC p_conflict"], rows)]
    for name, s in stats.items():
        if s["n"] == 0:
            parts.append(f"**No `{name}` labels**: none of the {test.height} {LOCALISATION_SPLIT}-split units has "
                         f"one (the benchmark does not give it), so the `{name}` row is not computed.")
        elif s["n"] < test.height:
            parts.append(f"`{name}`: {s['n']} of {test.height} {LOCALISATION_SPLIT}-split units carry the label; "
                         "the others (label unknown) are left out.")
    return "\n\n".join(parts)


def _examples(scored: pl.DataFrame, items: pl.DataFrame, predictions: pl.DataFrame | None, split: str) -> list[str]:
    """Three evaluated items (those with a conflicting unit first) with every unit's labels, score and flag."""
    ids = scored.filter(pl.col("split") == split).group_by("item_id").agg(
        (pl.col("conflicting").fill_null(False) | (pl.col("label") == "conflict").fill_null(False)).any()
        .alias("has_conflict")
    ).sort(["has_conflict", "item_id"], descending=[True, False])["item_id"].head(N_EXAMPLES).to_list()
    out = []
    for item_id in ids:
        item = items.filter(pl.col("item_id") == item_id).row(0, named=True)
        lines = [f"**{item_id}**: {item['question']}  ",
                 f"context answer: {', '.join(item['answers'])}; memorised answer: {', '.join(item['orig_answers'] or ['n/a'])}"]
        if predictions is not None:
            preds = predictions.filter(pl.col("item_id") == item_id)
            if preds.height:
                lines[-1] += "  "
                lines.append("answers: " + "; ".join(f"{label(m)}: \"{p}\"" for m, p in preds.select("method", "prediction").iter_rows()))
        sents = scored.filter(pl.col("item_id") == item_id).sort("sent_idx")
        rows = [[r["sent_idx"], r["label"] or "n/a", *(_yes_no(r[c]) for c in LABELS), fmt(r["p_conflict"]),
                 "yes" if r["flagged"] else "", r["text"]] for r in sents.iter_rows(named=True)]
        header = ["#", "label", "true", "relevant", "conflicting", "p_conflict", "flagged", "sentence"]
        out.append("\n".join(lines) + "\n\n" + md_table(header, rows))
    return out


def section_localisation(
    sentences: pl.DataFrame | None, scores: pl.DataFrame | None, items: pl.DataFrame,
    predictions: pl.DataFrame | None, best: dict | None, split: str, per_layer: pl.DataFrame | None = None,
) -> str:
    """How well the probe finds the conflicting (and the false) units inside real contexts; per layer, with and
    without relevance pruning."""
    head = "## Conflict localisation on context sentences"
    if sentences is None or scores is None:
        return f"{head}\n\nNo `sentences` or `sentence_scores` table: the decompose or probes stage did not run."
    if best is not None:
        chosen = scores.filter((pl.col("layer") == best["layer"]) & (pl.col("probe") == best["probe"]))
        scores = chosen if chosen.height else scores
    units = localisation_units(sentences, scores, items)
    parts = [
        head,
        f"The probe's flags (precision, recall, F1) and its p_conflict (AUROC) on the `{LOCALISATION_SPLIT}` "
        "split's context units, against `conflicting` (relevant to the question and false: the unit CLEAR should "
        "mark) and, separately, against `not truthful` (false, relevant or not). Only units whose label is known "
        "count; a unit the probe did not score was not flagged and is left out of the AUROC (`scored`). "
        + ("The relevance filter ran, so only the units it kept could be flagged." if relevance_filtered(sentences)
           else "No relevance filter ran: every scored unit could be flagged."),
        localisation_table(units),
        section_layer_localisation(per_layer, best),
        f"Examples from the evaluated split (`{split}`):",
        *_examples(units, items, predictions, split),
    ]
    return "\n\n".join(parts)


def section_methods(overall_metrics: pl.DataFrame, metrics: pl.DataFrame) -> str:
    """Every method's overall metrics with CIs and the headline MR; whether two methods differ is left to the paired
    comparisons (two overlapping per-method intervals say nothing about the difference on the same items)."""
    rows = [[label(r["method"]), r["n"], *metric_cells(r)] for r in overall_metrics.iter_rows(named=True)]
    return "\n\n".join([
        "## Method comparison",
        "Percent, with 95% bootstrap confidence intervals over items. p_s: the answer states the context's "
        "answer (not negated, without the memorised one); p_o: it states the memorised answer; "
        "MR = p_o / (p_s + p_o), lower is more faithful to the context. p_s, p_o and MR are over counterfactual "
        "items only. Per-sample answers: `predictions.parquet`.",
        method_legend(overall_metrics["method"].to_list()),
        md_table(["method", "n", *METRIC_LABELS.values()], rows),
        headline_mr(metrics),
        "These intervals describe each method alone; whether two methods differ is judged on the same items in "
        "*Paired comparisons*. CLEAR is fine-tuned on the train split while the prompt baselines are not; the "
        "ablation *CLEAR weights, no markers* (the same adapter on the unmarked context) tells how much of its gain "
        "comes from the probe's markers at inference (`--evaluate.references clear_unmarked` pairs every method "
        "with it).",
        "![Metrics per method with 95% CIs](figures/methods.png)",
    ])


def lfd_lines(lfd_layers: pl.DataFrame | None) -> list[str]:
    """LFD's layer choice in one line (none when LFD was not evaluated): the fused layer and the candidates' IKS."""
    if lfd_layers is None or not lfd_layers["chosen"].any():
        return []
    chosen = lfd_layers.filter(pl.col("chosen")).row(0, named=True)
    candidates = lfd_layers.filter(pl.col("candidate")).sort("layer")
    values = ", ".join(f"{r['layer']}: {fmt(r['iks'], 4)}" for r in candidates.iter_rows(named=True))
    return [f"**LFD** fuses layer {chosen['layer']} with the final layer: the lowest internal knowledge score (IKS, the"
            f" JSD of the logit lens before vs after the layer's FFN, mean over {chosen['n_items']} dev items) of"
            f" layers {candidates['layer'][0]}-{candidates['layer'][-1]} ({values}; every layer: `lfd_layers.parquet`)."]


# ---------------------------------------------------------------- figures (matplotlib imported only to draw one)


def draw_probe_layers(probe_metrics: pl.DataFrame, best: dict | None) -> Figure:
    """AUROC and accuracy per layer, dev solid and test dashed, one colour per probe kind and position."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharex=True)
    probe_metrics = with_position(probe_metrics)
    lines = sorted(probe_metrics.select("probe", "position").unique().iter_rows())
    colours = dict(zip(lines, [f"C{i}" for i in range(10)] * 4))
    for ax, col, name in zip(axes, ("auroc", "accuracy"), ("AUROC", "accuracy")):
        for (probe, position, split), part in sorted(probe_metrics.filter(pl.col("split").is_in(["dev", "test"]))
                                                     .group_by("probe", "position", "split"), key=lambda g: g[0]):
            part = part.sort("layer")
            ax.plot(part["layer"], part[col].cast(pl.Float64).fill_null(float("nan")), marker=".",
                    color=colours[probe, position], linestyle="-" if split == "dev" else "--",
                    label=f"{probe} {position} {split}")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        if best is not None:
            ax.axvline(best["layer"], color="black", linewidth=0.8, linestyle=":", label=f"best layer {best['layer']}")
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"probe {name} per layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def draw_methods(metrics: pl.DataFrame) -> Figure:
    """Grouped bars of EM, F1, p_s, p_o, MR per method with their 95% CI error bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    names = list(METRIC_LABELS)
    n_methods = max(metrics.height, 1)
    width = 0.8 / n_methods
    x = np.arange(len(names))
    for i, r in enumerate(metrics.iter_rows(named=True)):
        vals = np.array([np.nan if missing(r[m]) else r[m] for m in names], dtype=float)
        lo = np.array([np.nan if missing(r[f"{m}_lo"]) else r[f"{m}_lo"] for m in names], dtype=float)
        hi = np.array([np.nan if missing(r[f"{m}_hi"]) else r[f"{m}_hi"] for m in names], dtype=float)
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
        ax.bar(x + (i - (n_methods - 1) / 2) * width, np.nan_to_num(vals), width, yerr=err, capsize=2,
               label=label(r["method"]))
    ax.set_xticks(x, [METRIC_LABELS[m] for m in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction (MR: ratio)")
    ax.set_title("methods on the evaluated split (95% bootstrap CIs)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# ---------------------------------------------------------------- stage


def run_report(cfg: RunConfig, paths: RunPaths) -> None:
    """Write report.md, figures/{probe_layers,localisation_layers,methods}.png and trace.html from the run's
    tables."""
    conf = run_config(cfg, paths)
    items = read_table(paths.table("items"))
    metrics = with_subset_columns(read_table(paths.table("metrics")))
    overall_metrics = overall(metrics)
    predictions = read_optional_table(paths.table("predictions"))
    probe_metrics = read_optional_table(paths.table("probe_metrics"))
    best = _optional_json(paths.best_probe)
    train_log = _optional_json(paths.train_log)
    per_layer = read_optional_table(paths.table("probe_localisation"))
    if probe_metrics is not None:
        save_figure(draw_probe_layers, paths.figures / "probe_layers.png", probe_metrics, best)
    if per_layer is not None and per_layer.height:
        save_figure(layer_localisation_figure, paths.figures / "localisation_layers.png", per_layer, best)
    save_figure(draw_methods, paths.figures / "methods.png", overall_metrics)
    comparisons = read_optional_table(paths.table("comparisons"))
    insideout = read_optional_table(paths.table("insideout_layers"))
    if insideout is not None and insideout.filter(pl.col("split") == "test").height:
        save_figure(plot_insideout, paths.figures / INSIDEOUT_FIGURE, insideout)
    evaluated, references = overall_metrics["method"].to_list(), list(conf.evaluate.references)
    sections = [
        f"# clearflow report: {paths.root.name}",
        "Every evaluated item, its context coloured by p_conflict and every method's answer: [trace.html](trace.html)"
        " (opens in a browser from the file system).",
        section_what_ran(conf, items, overall_metrics, train_log),
        section_probes(probe_metrics, best),
        section_localisation(
            read_optional_table(paths.table("sentences")), read_optional_table(paths.table("sentence_scores")),
            items, predictions, best, conf.evaluate.split, per_layer,
        ),
        section_methods(overall_metrics, metrics),
        section_paired(comparisons, evaluated, references),
        *lfd_lines(read_optional_table(paths.table("lfd_layers"))),
        section_subsets(metrics),
        section_paired_subsets(comparisons, references),
        section_insideout(insideout),
        section_analyses(paths),
    ]
    with atomic_path(paths.report) as tmp:
        tmp.write_text("\n\n".join(filter(None, sections)) + "\n", encoding="utf-8")
    facts = {"model": conf.model.name, "dataset": conf.dataset, "limit": conf.limit, "seed": conf.seed}
    write_trace_page(paths, facts, conf.evaluate.split, paths.artifact("trace"))
