"""Conflict-aware LoRA fine-tuning (docs/METHOD.md stage 3), one adapter per configured arm.

Loss per training example (batch 1): ``L = (1 - lambda) * CE + lambda * L_attn`` (tasks/finetune/attention.py;
examples in tasks/finetune/examples.py). The arms (tasks/finetune/arms/) share everything but their markers,
their attention loss and (KAFT) their items: the same selected train items, budget, learning rate, schedule
and seed, and one training loop (tasks/finetune/training.py). Each arm's adapter goes to ``adapters/<arm>/``
with its log; ``adapters/train_log.json`` holds every arm's log, and adapters of arms no longer configured are
removed, so the directory the manifest records is the configured arms' and nothing else.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from tasks.core.config import ModelConfig, RunConfig, finetune_seed
from tasks.core.marking import context_units
from tasks.core.models import LOADING, load_model, load_tokenizer
from tasks.core.storage import RunPaths, read_table, write_json
from tasks.finetune.arms import REGISTRY, Arm, resolve_arms
from tasks.finetune.data import TrainItem, arm_items
from tasks.finetune.examples import Example, build_example, select_train_items
from tasks.finetune.training import history_summary, lora_model, save_adapter_atomically, train

log = logging.getLogger(__name__)


def arm_examples(arm: Arm, train_items: Sequence[TrainItem], tok, max_length: int) -> list[Example]:
    """Tokenized examples of an arm's items, under the arm's prompt (its evaluation method's builder)."""
    return [build_example(tok, t.question, t.context, t.answers, max_length, messages=arm.messages)
            for t in train_items]


def _data_log(arm: Arm, train_items: Sequence[TrainItem], examples: Sequence[Example], lam: float) -> dict:
    """What an arm trained on: sizes, markers, conditions, lambda."""
    return {
        "arm": arm.name,
        "markers": arm.markers,
        "attention": arm.attention,
        "data": arm.data,
        "lambda": lam,
        "n_items": len(examples),
        "n_marked": sum(any(e.marked) for e in examples),
        "n_truncated": sum(e.truncated for e in examples),
        "n_unsentenced": sum(not t.sentenced for t in train_items) if arm.marked else 0,
        "conditions": dict(sorted(Counter(t.condition or "unknown" for t in train_items).items())),
    }


def train_arm(cfg: RunConfig, paths: RunPaths, arm: Arm, train_items: Sequence[TrainItem],
              examples: Sequence[Example]) -> dict:
    """Train one arm's adapter from the shared starting point and save it with its log; returns the log."""
    fcfg = cfg.finetune
    lam = fcfg.attn_lambda if arm.attention else 0.0
    sizes = _data_log(arm, train_items, examples, lam)
    log.info("finetune %s: %d items (%d with a marked span), %d truncated from the left to %d tokens", arm.name,
             sizes["n_items"], sizes["n_marked"], sizes["n_truncated"], fcfg.max_length)
    seed = finetune_seed(cfg)
    model, targets = lora_model(cfg.model, fcfg, seed)
    hist = train(model, examples, fcfg, lam, seed, desc=f"finetune {arm.name}")
    train_log = {
        **sizes,
        **history_summary(hist),
        "lr": fcfg.lr,
        "target_modules": targets,
        "model": cfg.model.name,
        "seed": seed,
        "config": fcfg.model_dump(mode="json"),
    }
    model.eval()
    save_adapter_atomically(model, paths.arm_adapter(arm.name), train_log)
    log.info("finetune %s: %d steps in %.1f s; CE %.3f -> %.3f", arm.name, train_log["steps"], hist.seconds,
             train_log["ce_first"], train_log["ce_last"])
    return train_log


def _remove_other_arms(paths: RunPaths, keep: Sequence[str]) -> None:
    """Remove adapters of arms an earlier config trained and this one does not list."""
    if not paths.adapters.exists():
        return
    for d in paths.adapters.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
            log.info("finetune: removing the adapter of arm %r, not in finetune.arms", d.name)
            shutil.rmtree(d)


def run_finetune(cfg: RunConfig, paths: RunPaths) -> None:
    """Train every configured arm on the same selected items; save each adapter and every arm's log."""
    fcfg = cfg.finetune
    arms = resolve_arms(fcfg.arms)
    items = read_table(paths.table("items"))
    seed = finetune_seed(cfg)
    selected = select_train_items(items, fcfg.max_items, seed)
    units = context_units(paths)
    tok = load_tokenizer(cfg.model)
    data = {arm.name: arm_items(arm, selected, items, units, seed) for arm in arms}  # every refusal before training
    examples = {arm.name: arm_examples(arm, data[arm.name], tok, fcfg.max_length) for arm in arms}
    unsentenced = sum(i not in units for i in selected["item_id"].to_list())
    if unsentenced and any(a.marked for a in arms):
        log.warning("%d train items have no sentences; marked arms use their unmarked context", unsentenced)
    logs = {arm.name: train_arm(cfg, paths, arm, data[arm.name], examples[arm.name]) for arm in arms}
    _remove_other_arms(paths, [a.name for a in arms])
    write_json(logs, paths.train_log)


def require_adapters(paths: RunPaths, arms: Sequence[str]) -> None:
    """One line naming every arm without an adapter in the run, and the command that trains it."""
    resolve_arms(list(dict.fromkeys(arms)))  # an unknown arm is refused with the known ones
    present = adapter_dirs(paths)
    missing = [a for a in dict.fromkeys(arms) if a not in present]
    if not missing:
        return
    run = paths.root.name
    raise FileNotFoundError(
        f"run {run!r} has no adapter of fine-tuning arm(s) {missing} (looked in {paths.adapters}/<arm>/): train"
        f" them with `clearflow run --run {run} --finetune.arms {','.join([*present, *missing])}`"
    )


def load_finetuned(cfg: RunConfig, paths: RunPaths, arm: str = "clear") -> nn.Module:
    """The base model with one arm's trained adapter merged in, in eval mode, for evaluation."""
    require_adapters(paths, [arm])
    return merged_adapter(cfg.model, paths.arm_adapter(arm))


def merged_adapter(model_cfg: ModelConfig, adapter_dir: Path) -> nn.Module:
    """The base model with the adapter saved in `adapter_dir` merged in, in eval mode (also on a Dask worker)."""
    from peft import PeftModel

    base = load_model(model_cfg)
    with LOADING:  # as transformers' loading (tasks/core/models.py)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return model.eval()


def adapter_dirs(paths: RunPaths) -> dict[str, Path]:
    """arm -> adapter directory of every arm the run holds an adapter for."""
    return {a: paths.arm_adapter(a) for a in REGISTRY if (paths.arm_adapter(a) / "adapter_config.json").exists()}
