"""Base-model answers kept by content, so runs that differ only in their fine-tuning (a sweep's seeds) generate them
once.

An entry is one method's answers to one ordered list of prompts. Its key hashes everything that decides those
answers: the weights (model_fingerprint) and model options, the method and its decoding, every evaluate option but
those that change no answer to a given prompt, and the prompts themselves. Generation is greedy and batched in a
fixed order, so a hit returns what generating again would. Only base-model methods are kept: an adapter's answers
change with the adapter, which the key could not see. A decoding that reads more than its prompts (LFD chooses its
layer on dev items) puts those inputs in the key too (`extra`), and an entry keeps the tables the decoding writes
besides its answers (LFD's per-layer table), so a hit restores them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.config import ConfigView, RunConfig
from tasks.core.models import model_fingerprint
from tasks.core.storage import write_json
from tasks.evaluate.methods import Method

NOT_GENERATION = ("methods", "split", "bootstrap", "answer_cache", "references")  # evaluate options no answer to a prompt depends on


def kept(method: Method) -> bool:
    """Whether a method's answers are kept: those of the base model (an adapter's change with the adapter)."""
    return method.weights == "base"


class AnswerCache:
    """A directory of `<key>.json` entries ({method, n, answers}), each written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: RunConfig | ConfigView) -> AnswerCache | None:
        """The run's cache (`evaluate.answer_cache`), or None when reuse is off."""
        return None if cfg.evaluate.answer_cache is None else cls(cfg.evaluate.answer_cache)

    @staticmethod
    def key(cfg: RunConfig | ConfigView, method: Method, prompts: Sequence[str], extra: Any = None) -> str:
        """Content key of one method's answers to these prompts (and `extra`, the other inputs its decoding reads)
        under this run's model and generation options."""
        generation = {k: v for k, v in cfg.evaluate.model_dump(mode="json").items() if k not in NOT_GENERATION}
        blob = [model_fingerprint(cfg.model), cfg.model.model_dump(mode="json"), generation, method.name,
                method.weights, method.decoding, list(prompts)]
        if extra is not None:
            blob.append(extra)
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]

    def entry(self, cfg: RunConfig | ConfigView, method: Method, prompts: Sequence[str],
              extra: Any = None) -> dict | None:
        """The kept entry ({method, n, answers, tables}), or None (not kept, or not a base-model method)."""
        if not kept(method):
            return None
        path = self.root / f"{self.key(cfg, method, prompts, extra)}.json"
        if not path.exists():
            return None
        found = json.loads(path.read_text())
        return found if len(found["answers"]) == len(prompts) else None

    def get(self, cfg: RunConfig | ConfigView, method: Method, prompts: Sequence[str],
            extra: Any = None) -> list[str] | None:
        """The kept answers, or None."""
        found = self.entry(cfg, method, prompts, extra)
        return None if found is None else found["answers"]

    def put(self, cfg: RunConfig | ConfigView, method: Method, prompts: Sequence[str], answers: list[str],
            extra: Any = None, tables: dict[str, list[dict]] | None = None) -> None:
        """Keep a base-model method's answers and the tables its decoding wrote (others are ignored)."""
        if kept(method):
            found = {"method": method.name, "n": len(answers), "answers": list(answers), "tables": tables or {}}
            write_json(found, self.root / f"{self.key(cfg, method, prompts, extra)}.json")
