"""The training loop every arm shares: LoRA on the base model, AdamW at a constant rate, batch 1, items shuffled
with the seed, loss ``(1 - lambda) * CE + lambda * L_attn`` (lambda 0 for an arm without the attention loss).

Each arm starts from the same state: the torch seed is set before the model loads (LoRA's initialisation) and
the shuffle has its own seeded generator, so an arm's adapter does not depend on which arms train before it.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tasks.core.progress import tqdm

from tasks.core.config import FinetuneConfig, ModelConfig
from tasks.core.models import LOADING, decoder_layers, load_model
from tasks.core.storage import write_json
from tasks.finetune.attention import AttentionGrabber, attention_loss, last_attention_module
from tasks.finetune.examples import IGNORE, Example

TRAIN_LOG = "train_log.json"  # inside each arm's adapter directory

log = logging.getLogger(__name__)


def present_target_modules(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    """The configured LoRA target names that exist as linear leaves of this model (others skipped); where none
    does (an architecture that names its projections otherwise, e.g. GPT-2's fused `c_attn`), peft's own
    default targets for the model type."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    present = [w for w in wanted if w in names]
    if present:
        return present
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fallback = [w for w in PEFT_DEFAULTS.get(model_type, []) if w in names]
    if not fallback:
        raise ValueError(f"none of the LoRA target modules {list(wanted)} exist in the model, and peft has no"
                         f" default for model type {model_type!r}: set --finetune.target-modules to names among"
                         f" {sorted(names)[:12]}")
    log.info("finetune: none of %s in this %s model: LoRA on peft's default targets for it, %s",
             list(wanted), model_type, fallback)
    return fallback


def lora_model(model_cfg: ModelConfig, fcfg: FinetuneConfig, seed: int) -> tuple[nn.Module, list[str]]:
    """The base model (eager attention, for the hook) with fresh LoRA weights drawn under `seed`, in train mode."""
    from peft import LoraConfig, get_peft_model

    with LOADING:  # the LoRA init draws from torch's process-wide generator: no other thread's draws in between
        torch.manual_seed(seed)
        model = load_model(model_cfg, attn_implementation="eager")
        targets = present_target_modules(model, fcfg.target_modules)
        lora = LoraConfig(
            r=fcfg.lora_r, lora_alpha=fcfg.lora_alpha, lora_dropout=fcfg.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.train()
    if fcfg.compile:
        compile_blocks(model)
    return model, targets


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Compile every decoder block's forward but the last's: batch-1 steps of a small model spend a third of their
    time in unfused elementwise ops, and the last block stays eager because its attention hook feeds the loss.
    Shapes are dynamic (examples differ in length), so one graph serves every step and every block."""
    blocks = list(decoder_layers(model))[:-1]
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    return blocks


def uncompile_blocks(model: nn.Module) -> bool:
    """Put the blocks `compile_blocks` compiled back on their eager forward; whether any was compiled."""
    compiled = [b for b in decoder_layers(model) if "forward" in vars(b)]
    for block in compiled:
        del block.forward  # the instance attribute shadowed the class's forward
    return bool(compiled)


@dataclass
class History:
    """Per-step losses of one training run (L_attn is None on a step without a marked token)."""

    ce: list[float] = field(default_factory=list)
    attn: list[float | None] = field(default_factory=list)
    seconds: float = 0.0


def keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward can compute logits at the last k positions only (`logits_to_keep`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_ce(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, last_only: bool) -> torch.Tensor:
    """Token CE on the answer, as `model(labels=...)` computes it; with `last_only`, the LM head runs on the
    answer's positions alone (the target is a suffix): over a whole prompt it is a fifth of a small model's step.
    """
    if not last_only:
        return model(input_ids=ids, labels=labels, use_cache=False).loss
    n_target = int((labels[0] != IGNORE).sum())
    if n_target == 0 or bool((labels[0, -n_target:] == IGNORE).any()):
        raise ValueError("the CE target must be a non-empty suffix of the example")
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n_target + 1).logits
    return F.cross_entropy(logits[0, :-1].float(), ids[0, -n_target:])


def _step(model: nn.Module, grabber: AttentionGrabber, optimizer, ex: Example, lam: float,
          device, last_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on one example; (loss, CE, L_attn), detached."""
    ids = torch.tensor([ex.input_ids], device=device)
    labels = torch.tensor([ex.labels], device=device)
    marked = torch.tensor(ex.marked, device=device)
    ce = answer_ce(model, ids, labels, last_only)
    attn = attention_loss(grabber.pop()[0], marked)
    loss = (1.0 - lam) * ce + lam * attn
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), ce.detach(), attn.detach()


def _first_step(model: nn.Module, grabber: AttentionGrabber, optimizer, ex: Example, lam: float,
                device, last_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first step, where compiling happens: if it fails (no C++ compiler, an op the compiler lacks), the blocks
    go back to eager with one warning and the step runs again (no weight has changed: the failure is in forward)."""
    try:
        return _step(model, grabber, optimizer, ex, lam, device, last_only)
    except Exception as exc:  # noqa: BLE001 - any compiler failure; an eager failure is raised again below
        if not uncompile_blocks(model):
            raise
        root = exc
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner  # the compiler's own error, not dynamo's wrapper around it
        log.warning("finetune: torch.compile failed (%s: %s); training eagerly (--no-finetune.compile skips the"
                    " attempt)", type(root).__name__, (str(root).strip().splitlines() or [""])[0])
        optimizer.zero_grad(set_to_none=True)
        grabber.weights = None
        return _step(model, grabber, optimizer, ex, lam, device, last_only)


def adamw(params: list[nn.Parameter], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its fused kernel (CPU and CUDA): LoRA has hundreds of small tensors, and the default per-tensor
    loop on CPU costs a dozen tiny ops each per step."""
    return torch.optim.AdamW(params, lr=lr, fused=device.type in ("cpu", "cuda"))


def train(model: nn.Module, examples: Sequence[Example], fcfg: FinetuneConfig, lam: float, seed: int,
          desc: str = "finetune") -> History:
    """`fcfg.epochs` passes over the examples in a seeded order, one AdamW step each at `fcfg.lr`."""
    device = next(model.parameters()).device
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], fcfg.lr, device)
    grabber = AttentionGrabber(last_attention_module(model))
    rng = random.Random(seed)
    last_only = keeps_logits(model)
    hist = History()
    start = time.perf_counter()
    bar = tqdm(total=len(examples) * fcfg.epochs, desc=desc, unit="step")
    try:
        for _ in range(fcfg.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for i in order:
                loss, ce, attn = _first_step(model, grabber, optimizer, examples[i], lam, device, last_only) \
                    if not hist.ce else _step(model, grabber, optimizer, examples[i], lam, device, last_only)
                hist.ce.append(float(ce))
                hist.attn.append(float(attn) if any(examples[i].marked) else None)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}", ce=f"{hist.ce[-1]:.3f}")
    finally:
        bar.close()
        grabber.remove()
    hist.seconds = time.perf_counter() - start
    if not all(math.isfinite(v) for v in hist.ce):
        raise FloatingPointError("non-finite cross-entropy during fine-tuning")
    return hist


def window_mean(values: Sequence[float | None], first: bool) -> float | None:
    """Mean over the first or last 20% of steps (at least one), ignoring steps without a value."""
    k = max(1, math.ceil(0.2 * len(values)))
    window = values[:k] if first else values[-k:]
    kept = [v for v in window if v is not None]
    return float(sum(kept) / len(kept)) if kept else None


def history_summary(hist: History) -> dict:
    """Steps, time and the loss windows that a train log records."""
    return {
        "steps": len(hist.ce),
        "seconds": round(hist.seconds, 2),
        "seconds_per_step": round(hist.seconds / max(len(hist.ce), 1), 4),
        "ce_first": window_mean(hist.ce, first=True),
        "ce_last": window_mean(hist.ce, first=False),
        "attn_first": window_mean(hist.attn, first=True),
        "attn_last": window_mean(hist.attn, first=False),
    }


def _sort_target_modules(config: Path) -> None:
    """peft holds target_modules as a set and saves it in hash order, which differs between processes: sorted, two
    identical runs write identical adapter bytes."""
    data = json.loads(config.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_adapter_atomically(model: nn.Module, target: Path, log_obj: dict) -> Path:
    """Write the adapter and its log into a temp dir beside `target`, then swap it in whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _sort_target_modules(tmp / "adapter_config.json")
        write_json(log_obj, tmp / TRAIN_LOG)
        if target.exists():
            os.replace(target, old)  # os.replace cannot overwrite a non-empty directory
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target
