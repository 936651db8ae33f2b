"""Transfer: the saved probes of one run scored on the statements of another source (another run's statements).

The reference trains its probe on MQuAKE statements and applies it elsewhere; nothing so far said whether a probe
fitted on one source of statements reads conflict in another's. Here every saved probe of the source run (per kind
and layer, fitted on train, and the final one, refitted on train+dev) scores every statement of the target run,
read from the target's activation store at the probe's position: AUROC over all target statements and over those
whose subject and text the probe never saw. Both runs must hold states of the same model, fed the same way
(activations.strip_final_punct); anything else is one error line naming the run and the command that fixes it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from schemas.layout import analysis_path
from schemas.tables import PROBE_TRANSFER
from tasks.core.activation_store import CTX_POSITIONS, ActivationStore, model_dir
from tasks.core.storage import RunPaths, model_slug, read_table, write_parquet
from tasks.probes.kinds import Probe, load_probe
from tasks.probes.selection import select_best, split_metrics

log = logging.getLogger(__name__)

FOLD_FILE = re.compile(r"^fold-\d+$")  # cross-fitted fold probes (tasks/probes/crossfit.py) score units, not sources
SUBSETS = ("all", "unseen")


@dataclass(frozen=True)
class SavedProbe:
    """A probe file of the source run and what its metadata says about it."""

    file: str  # name under the run's probes/
    probe: Probe
    kind: str
    layer: int
    position: str
    fitted_on: tuple[str, ...]
    threshold: float
    source_test_auroc: float | None


def saved_probes(probes_dir: Path, dim: int, features: str = "the features") -> list[SavedProbe]:
    """Every per-layer probe and the final probe of a run (fold probes excluded), loaded through its kind and
    refused in one line unless it reads `dim`-wide states (`load_probe`)."""
    files = sorted(p for p in Path(probes_dir).glob("*.safetensors") if not FOLD_FILE.match(p.stem))
    if not files:
        raise FileNotFoundError(f"{probes_dir} holds no probe: run the probes stage of that run first")
    return [_load(path, dim, features) for path in files]


def _load(path: Path, dim: int, features: str) -> SavedProbe:
    """One probe file with its JSON metadata (kind, layer, position, splits fitted on, own test AUROC)."""
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: the probes stage writes it beside {path.name}; run it again")
    probe = load_probe(path, dim, features)
    meta = json.loads(meta_path.read_text())
    test = (meta.get("metrics") or {}).get("test") or {}
    return SavedProbe(path.name, probe, meta["kind"], int(meta["layer"]), meta.get("position", "last"),
                      tuple(meta.get("fitted_on") or ["train"]), float(meta.get("threshold", 0.5)), test.get("auroc"))


def target_statements(target: RunPaths, model: str) -> tuple[pl.DataFrame, ActivationStore]:
    """The target run's statements and its activation store of `model`, or one line saying what is missing."""
    name = target.root.name
    make = f"`clearflow transfer --run SOURCE --statements-run {name} --dataset NAME` (--data-path FILE for a file)"
    if not target.table("statements").exists():
        raise FileNotFoundError(f"run {name!r} has no statements ({target.table('statements')}): make it with {make}")
    try:
        store = ActivationStore.open(target.activations, model)
    except FileNotFoundError:
        where = model_dir(target.activations, model_slug(model))
        raise FileNotFoundError(f"run {name!r} has no activations of model {model} ({where}): extract them with"
                                f" {make}") from None
    return read_table(target.table("statements")), store


def check_compatible(source_cfg: dict, store: ActivationStore, probes: list[SavedProbe], target: str) -> None:
    """Same text treatment and layers as the probes were fitted with (widths: `load_probe`); one line naming what
    differs."""
    meta = store.meta()
    strip, theirs = source_cfg["activations"]["strip_final_punct"], meta.get("strip_final_punct", True)
    if theirs != strip:
        raise ValueError(f"run {target!r} fed its statements with strip_final_punct={theirs}, the probes read texts"
                         f" fed with {strip}: make it again with the source run's activation options")
    for p in probes:
        if p.layer not in store.layers:
            raise ValueError(f"probe {p.file} reads layer {p.layer}, which run {target!r} did not extract (layers"
                             f" {store.layers}): extract it with the source run's --activations.layers")


def unseen(target: pl.DataFrame, source: pl.DataFrame, fitted_on: tuple[str, ...]) -> np.ndarray:
    """Target rows whose subject (group, case-folded) and text no statement the probe was fitted on shares."""
    seen = source.filter(pl.col("split").is_in(list(fitted_on)))
    groups, keys = {g.casefold() for g in seen["group"].to_list()}, set(seen["key"].to_list())
    return np.array([g.casefold() not in groups and k not in keys
                     for g, k in target.select("group", "key").iter_rows()], dtype=bool)


def score_probe(p: SavedProbe, store: ActivationStore, target: pl.DataFrame, source: pl.DataFrame) -> list[dict]:
    """The rows of one probe: its metrics over all target statements and over the unseen ones."""
    p_conflict = p.probe.predict_proba(store.vectors(p.layer, target["key"].to_list(), p.position))
    y = target["label"].to_numpy().astype(int)
    rows = []
    for subset, sel in (("all", np.ones(len(y), dtype=bool)), ("unseen", unseen(target, source, p.fitted_on))):
        metrics = split_metrics(p_conflict[sel], y[sel], p.threshold)
        if metrics["n"] == 0:
            continue
        rows.append({"probe_file": p.file, "probe": p.kind, "layer": p.layer, "position": p.position,
                     "fitted_on": "+".join(p.fitted_on), "subset": subset, "n_conflict": int(y[sel].sum()),
                     "source_test_auroc": p.source_test_auroc, **metrics})
    return rows


def dataset_label(run: RunPaths) -> str:
    """What the target's statements came from, as its manifest records it (known-facts with its generator)."""
    config = json.loads(run.manifest.read_text()).get("config", {}) if run.manifest.exists() else {}
    dataset = config.get("dataset", "unknown")
    version = (config.get("ingest") or {}).get("known_facts_version")
    return f"{dataset} v{version}" if dataset == "known-facts" and version else dataset


def run_transfer(source: RunPaths, target: RunPaths) -> pl.DataFrame:
    """Score the source run's probes on the target run's statements; the source's transfer table gains (or
    replaces) the target's rows. Returns the target's rows."""
    if source.root.resolve() == target.root.resolve():
        raise ValueError("the statements run is the probes' own run: name another run (--statements-run)")
    if not source.manifest.exists():
        raise FileNotFoundError(f"no run {source.root.name!r} under {source.root.parent} (no manifest.json):"
                                " name a run made by `clearflow run`")
    source_cfg = json.loads(source.manifest.read_text())["config"]
    model = source_cfg["model"]["name"]
    statements, store = target_statements(target, model)
    features = f"run {target.root.name!r}'s states of {store.meta().get('model', model)}"
    probes = [p for p in saved_probes(source.probes, store.dim, features)
              if p.position not in CTX_POSITIONS]  # those read sentences
    if not probes:
        raise ValueError(f"run {source.root.name!r} has no probe reading statements fed alone: nothing to transfer")
    if statements.height == 0:
        raise ValueError(f"run {target.root.name!r} has an empty statements table: its dataset gave no statements")
    check_compatible(source_cfg, store, probes, target.root.name)
    own = read_table(source.table("statements"))
    rows = [r for p in probes for r in score_probe(p, store, statements, own)]
    frame = pl.DataFrame(rows).with_columns(pl.lit(target.root.name).alias("target_run"),
                                            pl.lit(dataset_label(target)).alias("target_dataset"))
    path = analysis_path(source.root, "probe_transfer")
    if path.exists():  # other targets' rows stay
        frame = pl.concat([read_table(path).filter(pl.col("target_run") != target.root.name),
                           frame.select(PROBE_TRANSFER.names)], how="diagonal_relaxed")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(frame.select(PROBE_TRANSFER.names), path, PROBE_TRANSFER)
    mine = read_table(path).filter(pl.col("target_run") == target.root.name)
    log.info("transfer: %d probes of %s scored on %d statements of %s -> %s", len(probes), source.root.name,
             statements.height, target.root.name, path)
    return mine


def transfer_summary(source: RunPaths, rows: pl.DataFrame) -> str:
    """Per kind, the transfer of the layer the source's dev chose (as its probes stage chose), then the final probe."""
    metrics = read_table(source.table("probe_metrics"))
    lines = []
    for kind in sorted(rows["probe"].unique()):
        if kind not in metrics["probe"].to_list():
            continue
        layer = select_best(metrics, kind)["layer"]
        files = rows.filter((pl.col("probe") == kind) & (pl.col("layer") == layer) & (pl.col("fitted_on") == "train"))
        lines.append(f"{kind} layer {layer} (dev's choice): {_subsets(files)}")
    final = rows.filter(pl.col("probe_file") == "final.safetensors")
    if final.height:
        lines.append(f"final probe ({final['probe'][0]} layer {final['layer'][0]}, train+dev): {_subsets(final)}")
    return "\n".join(lines)


def _subsets(rows: pl.DataFrame) -> str:
    """'transfer AUROC a on all n statements, b on the m unseen (own test AUROC c)' for one probe file's rows."""
    by = {r["subset"]: r for r in rows.iter_rows(named=True)}
    words = {"all": "on all {n} statements", "unseen": "on the {n} unseen"}
    parts = [f"{_fmt(r['auroc'])} {words[s].format(n=r['n'])}" for s, r in by.items()]
    own = next(iter(by.values()))["source_test_auroc"] if by else None
    return "transfer AUROC " + ", ".join(parts) + f" (own test AUROC {_fmt(own)})"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
