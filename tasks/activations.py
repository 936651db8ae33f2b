"""Stage 3: last-token hidden states of every statement and context sentence, cached per layer as Parquet.

Layer numbering: layer L (0-based) is the output of decoder block L, i.e. Hugging Face's
`output_hidden_states` index L + 1. The last layer is the inner decoder's `last_hidden_state`
(the output after the final norm), which is exactly what HF returns as `hidden_states[-1]`
(transformers ties that entry to `last_hidden_state`), so no per-model norm name is needed:
whatever norm the architecture has (`norm`, `ln_f`, `final_layernorm`, ...) is applied by the
inner model itself.

Only the inner decoder runs (`model.get_decoder()`, never the LM head). Forward hooks sit on the
requested blocks alone; when the last layer is not requested, the hook of the deepest requested
block raises a private exception that ends the forward there, so no later block runs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from schemas.tables import activations_schema
from tasks.config import RunConfig
from tasks.models import decoder_layers, load_model, load_tokenizer
from tasks.storage import RunPaths, atomic_path, model_slug, read_table, text_key, write_json

log = logging.getLogger(__name__)

POSITION = "last"
FLUSH_ROWS = 4096  # rows buffered per layer before a Parquet row group is written (bounds memory)


class _StopForward(Exception):
    """Raised from the deepest requested block's hook so later blocks never run."""


def inner_decoder(model: nn.Module) -> nn.Module:
    """The base transformer under a causal-LM head (no lm_head, no logits), found via HF's own lookup."""
    get = getattr(model, "get_decoder", None)
    inner = get() if callable(get) else getattr(model, "base_model", model)
    return inner if inner is not None else model


def resolve_layers(requested: Sequence[int] | None, n_layers: int) -> list[int]:
    """Sorted unique 0-based layers to keep; None means all, out-of-range ones fail loudly."""
    layers = sorted(set(range(n_layers) if requested is None else requested))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or 'none'} invalid: the model has decoder layers 0..{n_layers - 1}")
    return layers


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar token length, so padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(ids: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token ids left or right; returns (input_ids, attention_mask)."""
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        out[row, sl] = torch.tensor(x, dtype=torch.long)
        mask[row, sl] = 1
    return out, mask


def _block_output(output) -> torch.Tensor:
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def iter_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    padding_side: str = "right",
    progress: bool = True,
) -> Iterator[tuple[list[int], dict[int, np.ndarray]]]:
    """Yield (text indices, {layer: float32 array (batch, d)}) of each text's last real token, batch by batch.

    Each text is tokenised alone (`add_special_tokens=True`, no chat template); batches are
    length-bucketed and padded on `padding_side`; the attention mask picks the last real token
    and gives position ids that match feeding the text alone.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    blocks = decoder_layers(model)
    layers = resolve_layers(layers, len(blocks))
    last = len(blocks) - 1
    inner = inner_decoder(model)
    takes_positions = "position_ids" in inspect.signature(inner.forward).parameters
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    token_ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    if any(len(x) == 0 for x in token_ids):
        raise ValueError("a text tokenised to zero tokens: nothing to take the last token of")

    captured: dict[int, torch.Tensor] = {}
    deepest_hooked = max((layer for layer in layers if layer != last), default=None)

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = _block_output(output)
            if layer == deepest_hooked and last not in layers:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers if layer != last]
    bar = tqdm(total=len(token_ids), unit="sent", desc="activations", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for batch in length_buckets([len(x) for x in token_ids], batch_size):
                input_ids, mask = _pad([token_ids[i] for i in batch], pad_id, padding_side)
                input_ids, mask = input_ids.to(device), mask.to(device)
                kwargs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
                if takes_positions:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                captured.clear()
                try:
                    out = inner(**kwargs)
                    captured[last] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                except _StopForward:
                    pass
                # last real token of each row: the highest position whose mask is 1
                positions = torch.arange(mask.shape[1], device=device)
                last_idx = (mask * positions).argmax(dim=-1)
                rows = torch.arange(len(batch), device=device)
                yield batch, {
                    layer: captured[layer][rows, last_idx].float().cpu().numpy() for layer in layers
                }
                bar.update(len(batch))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()


def extract(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    padding_side: str = "right",
    progress: bool = False,
) -> dict[int, np.ndarray]:
    """All texts' last-token vectors per layer, in input order (for small inputs and tests)."""
    out: dict[int, np.ndarray] = {}
    for batch, vectors in iter_activations(model, tokenizer, texts, layers, batch_size, padding_side, progress):
        for layer, array in vectors.items():
            if layer not in out:
                out[layer] = np.empty((len(texts), array.shape[1]), dtype=np.float32)
            out[layer][batch] = array
    return out


def probed_sentences(paths: RunPaths, sentences: str = "all") -> pl.DataFrame:
    """The context units that are probed: all of them, or only those the relevance filter kept."""
    frame = read_table(paths.table("sentences"))
    if sentences == "all":
        return frame
    if sentences != "relevant":
        raise ValueError(f"activations.sentences must be 'all' or 'relevant', not {sentences!r}")
    if "is_relevant" not in frame.columns or frame["is_relevant"].null_count() == frame.height:
        raise ValueError(f"{paths.table('sentences')} has no is_relevant values: run decompose with "
                         "decompose.relevance=true, or set activations.sentences='all'")
    return frame.filter(pl.col("is_relevant").fill_null(False))


def collect_texts(paths: RunPaths, sentences: str = "all") -> tuple[list[str], list[str], list[str]]:
    """Unique (keys, texts, sources): every statement, then probed sentences whose key no statement has."""
    keys: list[str] = []
    texts: list[str] = []
    sources: list[str] = []
    seen: set[str] = set()
    frames = {"statements": read_table(paths.table("statements")), "sentences": probed_sentences(paths, sentences)}
    for source, frame in frames.items():
        for key, text in frame.select("key", "text").iter_rows():
            if key in seen:
                continue
            if key != text_key(text):
                raise ValueError(f"{source}: key {key!r} is not text_key(text) of {text[:60]!r}")
            seen.add(key)
            keys.append(key)
            texts.append(text)
            sources.append(source)
    return keys, texts, sources


def fed_text(text: str, strip_final_punct: bool) -> str:
    """What the model reads for a text: without its closing . ! ? the last token ends the claim itself."""
    if strip_final_punct:
        stripped = text.rstrip().rstrip(".!?").rstrip()
        return stripped or text
    return text


def layer_path(paths: RunPaths, slug: str, layer: int) -> Path:
    """Hive-partitioned shard of one layer's vectors."""
    return paths.activations / f"model={slug}" / f"layer={layer}" / "part-00000.parquet"


def vectors_table(keys: list[str], sources: list[str], vectors: np.ndarray) -> pa.Table:
    """One Arrow batch of rows with a fixed-size-list vector column (no Python floats)."""
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "source": pa.array(sources, pa.string()),
            "position": pa.array([POSITION] * len(keys), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        },
        schema=activations_schema(dim),
    )


class _LayerWriters:
    """One streaming Parquet writer per layer, each behind an atomic temp file."""

    def __init__(self, stack: contextlib.ExitStack, paths: RunPaths, slug: str, layers: list[int], dim: int):
        self.schema = activations_schema(dim)
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.buffers: dict[int, list[tuple[list[str], list[str], np.ndarray]]] = {layer: [] for layer in layers}
        for layer in layers:
            tmp = stack.enter_context(atomic_path(layer_path(paths, slug, layer)))
            writer = pq.ParquetWriter(
                tmp,
                self.schema,
                compression="zstd",
                use_dictionary=["source", "position"],  # never on the vector column (it only grows files)
                use_byte_stream_split=["vector.list.element"],
            )
            # registered after atomic_path, so it closes before the temp file is renamed into place
            stack.callback(writer.close)
            self.writers[layer] = writer

    def add(self, layer: int, keys: list[str], sources: list[str], vectors: np.ndarray) -> None:
        """Buffer a batch; write a row group once enough rows have gathered."""
        self.buffers[layer].append((keys, sources, vectors))
        if sum(len(k) for k, _, _ in self.buffers[layer]) >= FLUSH_ROWS:
            self.flush(layer)

    def flush(self, layer: int) -> None:
        """Write the buffered rows of one layer as a row group."""
        buf = self.buffers[layer]
        if buf:
            keys = [k for ks, _, _ in buf for k in ks]
            sources = [s for _, ss, _ in buf for s in ss]
            self.writers[layer].write_table(vectors_table(keys, sources, np.concatenate([v for _, _, v in buf])))
            self.buffers[layer] = []


def run_activations(cfg: RunConfig, paths: RunPaths) -> dict[str, str]:
    """Cache last-token hidden states of all statements and sentences for the configured layers."""
    keys, texts, sources = collect_texts(paths, cfg.activations.sentences)
    if not keys:
        raise ValueError("no statements or sentences to extract activations for")
    model = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    blocks = decoder_layers(model)
    layers = resolve_layers(cfg.activations.layers, len(blocks))
    slug = model_slug(cfg.model.name)
    log.info("activations: %d texts, layers %s of %s, batch %d", len(keys), layers, slug, cfg.activations.batch_size)

    start = time.perf_counter()
    fed = [fed_text(t, cfg.activations.strip_final_punct) for t in texts]
    stream = iter_activations(model, tokenizer, fed, layers, cfg.activations.batch_size)
    with contextlib.closing(stream), contextlib.ExitStack() as stack:
        writers: _LayerWriters | None = None
        for batch, vectors in stream:
            if writers is None:  # the width comes from the first batch, whatever the config calls it
                writers = _LayerWriters(stack, paths, slug, layers, next(iter(vectors.values())).shape[1])
            batch_keys = [keys[i] for i in batch]
            batch_sources = [sources[i] for i in batch]
            for layer, array in vectors.items():
                writers.add(layer, batch_keys, batch_sources, array)
        for layer in layers:
            writers.flush(layer)
        dim = writers.schema.field("vector").type.list_size
    seconds = time.perf_counter() - start

    meta = {
        "model": cfg.model.name,
        "slug": slug,
        "revision": cfg.model.revision,
        "dtype": cfg.model.dtype,
        "layers": layers,
        "n_model_layers": len(blocks),
        "dim": dim,
        "position": POSITION,
        "strip_final_punct": cfg.activations.strip_final_punct,
        "sentences": cfg.activations.sentences,
        "n_keys": len(keys),
        "n_statements": sources.count("statements"),
        "n_sentences": sources.count("sentences"),
        "batch_size": cfg.activations.batch_size,
        "seconds": round(seconds, 3),
        "sentences_per_s": round(len(keys) / seconds, 2) if seconds > 0 else None,
    }
    meta_path = write_json(meta, paths.activations / f"model={slug}" / "meta.json")
    log.info("activations: %d texts in %.1f s (%.1f sentences/s)", len(keys), seconds, len(keys) / max(seconds, 1e-9))
    out = {f"activations_layer{layer}": str(layer_path(paths, slug, layer)) for layer in layers}
    out["activations_meta"] = str(meta_path)
    return out


def read_meta(paths: RunPaths, slug: str) -> dict:
    """The meta.json of a model's cached activations."""
    path = paths.activations / f"model={slug}" / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the activations stage first")
    return json.loads(path.read_text())


def load_vectors(paths: RunPaths, slug: str, layer: int, keys: Sequence[str]) -> np.ndarray:
    """float32 array (len(keys), d) of one layer's vectors, rows aligned to `keys`; missing keys fail loudly."""
    path = layer_path(paths, slug, layer)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the activations stage for layer {layer} first")
    table = pq.read_table(path, columns=["key", "vector"])
    dim = table.schema.field("vector").type.list_size
    wanted = pa.array(list(keys), pa.string())
    index = pc.index_in(wanted, value_set=table["key"].combine_chunks())
    if index.null_count:
        missing = wanted.filter(pc.is_null(index)).to_pylist()
        raise KeyError(
            f"{len(missing)} keys have no activation at layer {layer} in {path} (e.g. {missing[:3]}): "
            "re-run the activations stage on the current statements and sentences"
        )
    vectors = table["vector"].take(index).combine_chunks()
    return vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
