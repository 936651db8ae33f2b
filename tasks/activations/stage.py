"""Stage 3: hidden states of every statement and context sentence, from the shared activation store.

The extraction itself is tasks/activations/extraction.py (hooks, early exit, positions); the content-addressed, sharded,
resumable store (its layout and its reader, `ActivationStore.open`) is tasks/core/activation_store.py. This stage
gathers the inputs, looks the store up (a hit loads no model), extracts the shards still missing, verifies the finished
store and links it into the run's activations/ directory.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
from tasks.core.progress import tqdm

from tasks.core.activation_store import (
    CTX_POSITIONS,
    NUMPY_TYPES,
    SUBJECT_LAST,
    ActivationStore,
    Shard,
    StoreInputs,
    disk_estimate,
    human_bytes,
    configured_store,
    plan_shards,
    store_key,
    store_root,
    vectors_table,
)
from tasks.core.config import ActivationConfig, ModelConfig, RunConfig
from tasks.core.fanout import fan_out, fanned_out
from tasks.activations.extraction import (  # noqa: F401  (re-exported: the stage's public extraction API)
    extract,
    inner_decoder,
    iter_activations,
    iter_context_activations,
    length_buckets,
    resolve_layers,
)
from tasks.activations.subject import iter_last_and_subject, subject_spans
from tasks.core.remote_store import is_remote
from tasks.core.models import load_model, load_tokenizer, model_fingerprint, model_shape, worker_weights
from tasks.core.storage import RunPaths, model_slug, read_table, text_key

log = logging.getLogger(__name__)


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


def context_inputs(paths: RunPaths, sentences: str) -> tuple[list[str], list[str], list[list[tuple[str, int, int]]]]:
    """(context keys, contexts, per context its probed units' (key, start, end)); each context and unit once."""
    units = probed_sentences(paths, sentences).sort("item_id", "sent_idx")
    contexts = dict(read_table(paths.table("items")).select("item_id", "context").iter_rows())
    by_context: dict[str, tuple[str, dict[str, tuple[str, int, int]]]] = {}
    for item_id, key, start, end in units.select("item_id", "key", "char_start", "char_end").iter_rows():
        context = contexts[item_id]
        entry = by_context.setdefault(text_key(context), (context, {}))
        entry[1].setdefault(key, (key, int(start), int(end)))
    ckeys = list(by_context)
    return ckeys, [by_context[k][0] for k in ckeys], [list(by_context[k][1].values()) for k in ckeys]


def collect_inputs(paths: RunPaths, act: ActivationConfig) -> StoreInputs:
    """Everything the store must hold for this run: texts as fed (position last) and contexts (ctx_*)."""
    keys, texts, sources = collect_texts(paths, act.sentences)
    inputs = StoreInputs(keys=keys, texts=[fed_text(t, act.strip_final_punct) for t in texts], sources=sources)
    if any(p in CTX_POSITIONS for p in act.positions):
        inputs.context_keys, inputs.contexts, inputs.units = context_inputs(paths, act.sentences)
    if SUBJECT_LAST in act.positions:
        inputs.subjects = subject_spans(read_table(paths.table("statements")), inputs.keys, inputs.texts)
    return inputs


def fed_text(text: str, strip_final_punct: bool) -> str:
    """What the model reads for a text: without its closing . ! ? the last token ends the claim itself."""
    if strip_final_punct:
        stripped = text.rstrip().rstrip(".!?").rstrip()
        return stripped or text
    return text


def _shard_rows(inputs: StoreInputs, shard: Shard) -> int:
    """Rows (per layer and position) a shard yields."""
    if shard.kind == "last":
        return shard.stop - shard.start
    return sum(len(u) for u in inputs.units[shard.start : shard.stop])


class _ShardBuffer:
    """One array per layer for a shard's rows, allocated once and reused by every later shard of the run: a few
    large blocks instead of thousands of small ones, so the heap neither fragments nor grows from shard to shard."""

    _pool: dict[tuple[str, int, int, str], np.ndarray] = {}

    def __init__(self, n_rows: int, storage_dtype: str, tag: str = "last"):
        self.n_rows, self.dtype, self.tag = n_rows, NUMPY_TYPES[storage_dtype], tag
        self.arrays: dict[int, np.ndarray] = {}

    def _array(self, layer: int, dim: int) -> np.ndarray:
        """A view of n_rows rows of the pooled array of this layer (grown when a shard is larger)."""
        key = (self.tag, layer, dim, np.dtype(self.dtype).name)
        pooled = self._pool.get(key)
        if pooled is None or len(pooled) < self.n_rows:
            pooled = self._pool[key] = np.empty((self.n_rows, dim), dtype=self.dtype)
        return pooled[: self.n_rows]

    def put(self, rows: np.ndarray | list[int], vectors: dict[int, np.ndarray]) -> None:
        for layer, array in vectors.items():
            if layer not in self.arrays:
                self.arrays[layer] = self._array(layer, array.shape[1])
            self.arrays[layer][rows] = array

    @classmethod
    def release(cls) -> None:
        """Free the pooled arrays once a store is written."""
        cls._pool.clear()


def _last_tables(model, tok, inputs: StoreInputs, shard: Shard, layers, act: ActivationConfig, bar) -> dict[int, pa.Table]:
    """Per layer, the Arrow table of a 'last' shard, rows in input order (then its subject_last rows, when asked)."""
    keys, sources = inputs.keys[shard.start : shard.stop], inputs.sources[shard.start : shard.stop]
    texts = inputs.texts[shard.start : shard.stop]
    subjects = {row - shard.start: (s, e) for row, s, e in inputs.subjects if shard.start <= row < shard.stop}
    buf, sbuf = _ShardBuffer(len(keys), act.storage_dtype), _ShardBuffer(len(keys), act.storage_dtype, SUBJECT_LAST)
    if SUBJECT_LAST in act.positions:  # one forward gives both positions
        stream = iter_last_and_subject(model, tok, texts, subjects, layers, act.batch_size)
    else:
        stream = ((b, v, None) for b, v in iter_activations(model, tok, texts, layers, act.batch_size, progress=False))
    for batch, vectors, at_subject in stream:
        buf.put(batch, vectors)
        if at_subject is not None:
            sbuf.put(batch, at_subject)
        bar.update(len(batch))
    tables = {layer: vectors_table(keys, sources, buf.arrays[layer], "last", None, act.storage_dtype) for layer in layers}
    if SUBJECT_LAST in act.positions and subjects:
        rows = sorted(subjects)
        for layer in layers:
            subject_rows = vectors_table([keys[r] for r in rows], [sources[r] for r in rows], sbuf.arrays[layer][rows],
                                         SUBJECT_LAST, None, act.storage_dtype)
            tables[layer] = pa.concat_tables([tables[layer], subject_rows])
    return tables


def _ctx_tables(model, tok, inputs: StoreInputs, shard: Shard, layers, act: ActivationConfig, bar) -> dict[int, pa.Table]:
    """Per layer, the Arrow table of a 'ctx' shard: ctx_last and/or ctx_mean rows per sentence, in input order."""
    units = inputs.units[shard.start : shard.stop]
    first_row = np.cumsum([0] + [len(u) for u in units])  # row of each context's first sentence
    keys = [k for u in units for k, _, _ in u]
    ckeys = [inputs.context_keys[shard.start + i] for i, u in enumerate(units) for _ in u]
    bufs = {p: _ShardBuffer(len(keys), act.storage_dtype, p) for p in CTX_POSITIONS if p in act.positions}
    spans = [[(s, e) for _, s, e in u] for u in units]
    stream = iter_context_activations(model, tok, inputs.contexts[shard.start : shard.stop], spans, layers,
                                      act.context_batch_size, progress=False)
    for batch, last, mean in stream:
        rows = np.concatenate([np.arange(first_row[i], first_row[i + 1]) for i in batch])
        for position, vectors in (("ctx_last", last), ("ctx_mean", mean)):
            if position in bufs:
                bufs[position].put(rows, vectors)
        bar.update(len(rows))
    return {
        layer: pa.concat_tables([vectors_table(keys, ["sentences"] * len(keys), buf.arrays[layer], position, ckeys,
                                               act.storage_dtype) for position, buf in bufs.items()])
        for layer in layers
    }


def _announce(store: ActivationStore, inputs: StoreInputs, rows: int, layers, dim: int, act: ActivationConfig,
              todo: int, total: int) -> None:
    """Print the size of the job and the disk it needs before any model is loaded; refuse if it cannot fit."""
    need = disk_estimate(rows, len(layers), dim, act.storage_dtype)
    store.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.dir).free
    log.info("activations: %d texts alone + %d sentences in %d contexts -> %d rows x %d layers x %d dims (%s): "
             "<= %s on disk, %s free; %d of %d shards to extract into %s", len(inputs.keys),
             sum(len(u) for u in inputs.units), len(inputs.contexts), rows, len(layers), dim, act.storage_dtype,
             human_bytes(need), human_bytes(free), todo, total, store.dir)
    if need > free:
        raise RuntimeError(f"the activation store needs up to {human_bytes(need)} but {store.dir} has "
                           f"{human_bytes(free)} free: request fewer layers, float16 storage, or another --activations.store")


def extract_shards(
    model, tok, store: ActivationStore, inputs: StoreInputs, shards: Sequence[Shard], layers: Sequence[int],
    act: ActivationConfig, progress: bool = True,
) -> None:
    """Compute and write the given shards, one at a time (memory: one shard's vectors), with one progress bar."""
    bar = tqdm(total=sum(_shard_rows(inputs, s) for s in shards), unit="sent", desc="activations",
               dynamic_ncols=True, disable=not progress)
    try:
        with bar:
            for shard in shards:
                tables = (_last_tables if shard.kind == "last" else _ctx_tables)(model, tok, inputs, shard, layers, act,
                                                                              bar)
                store.write_shard(shard, tables)  # written before the next shard reuses the buffers
                del tables
    finally:
        _ShardBuffer.release()


@dataclass(frozen=True)
class ShardJob:
    """One shard to extract wherever it runs: only its own inputs, the options and the store it writes to."""

    model: ModelConfig
    act: ActivationConfig
    store: ActivationStore
    inputs: StoreInputs
    shard: Shard
    layers: tuple[int, ...]


def run_shard_job(job: ShardJob) -> str:
    """Extract and write one shard (a fanned-out job; it may run on another machine); returns its file name."""
    model, tok = worker_weights(job.model)
    if not job.store.shard_done(job.shard, job.layers):  # a retried job whose first try finished writes nothing
        extract_shards(model, tok, job.store, job.inputs, [job.shard], list(job.layers), job.act, progress=False)
    if job.store.remote:  # the job is done once its shard is published, not merely queued
        job.store.mirror().wait()
    return job.shard.name


def _extract(cfg: RunConfig, store: ActivationStore, inputs: StoreInputs, todo: list[Shard], layers: list[int]) -> None:
    """The missing shards: here with one model and one progress bar, or as one fanned-out job per shard."""
    if fanned_out():
        jobs = [ShardJob(cfg.model, cfg.activations, store, *inputs.for_shard(s), tuple(layers)) for s in todo]
        fan_out(run_shard_job, jobs, "activation-shard")
        return
    model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    extract_shards(model, tok, store, inputs, todo, layers, cfg.activations)


def build_store(cfg: RunConfig, store: ActivationStore, inputs: StoreInputs, layers: list[int], dim: int) -> dict:
    """Extract every shard the store lacks (resuming after a kill), verify it, mark it complete; returns meta."""
    act = cfg.activations
    expected = inputs.n_rows(act.positions)
    shards = plan_shards(inputs, act.positions, act.shard_rows)
    swept = store.sweep_partials()
    if store.remote:  # resume from the shards the remote copy holds (another machine's, or a killed run's)
        store.mirror().pull()
    todo = [s for s in shards if not store.shard_done(s, layers)]
    _announce(store, inputs, sum(expected.values()), layers, dim, act, len(todo), len(shards))
    if swept or len(todo) < len(shards):
        log.info("activations: resuming: %d shards already done, %d partial files discarded", len(shards) - len(todo), swept)
    start = time.perf_counter()
    n_rows = sum(_shard_rows(inputs, s) for s in todo)
    if todo:
        _extract(cfg, store, inputs, todo, layers)
        if store.remote:  # this process's uploads done; shards workers on other machines wrote are only remote
            store.mirror().wait()
            store.mirror().pull()
    seconds = time.perf_counter() - start
    store.verify(layers, shards, expected)
    meta = {
        "model": cfg.model.name, "slug": model_slug(cfg.model.name), "revision": cfg.model.revision,
        "dtype": cfg.model.dtype, "storage_dtype": act.storage_dtype, "layers": layers, "dim": dim,
        "positions": list(act.positions), "rows_by_position": expected, "n_rows": sum(expected.values()),
        "n_keys": len(inputs.keys), "n_statements": inputs.sources.count("statements"),
        "n_sentences": inputs.sources.count("sentences"), "n_contexts": len(inputs.contexts),
        "strip_final_punct": act.strip_final_punct, "sentences": act.sentences, "batch_size": act.batch_size,
        "shard_rows": act.shard_rows, "shards": [s.name for s in shards], "store_key": store.key,
        "seconds": round(seconds, 3), "sentences_per_s": round(n_rows / seconds, 2) if seconds > 0 and n_rows else None,
    }
    store.finish(meta)
    if store.remote:
        store.mirror().publish()
    log.info("activations: %d rows in %.1f s (%.1f sentences/s)", n_rows, seconds, n_rows / max(seconds, 1e-9))
    return meta


def open_store(cfg: RunConfig, inputs: StoreInputs) -> tuple[ActivationStore, list[int], int]:
    """The store these inputs and options map to, with the resolved layers and width (no weights loaded)."""
    act = cfg.activations
    n_model_layers, dim = model_shape(cfg.model)
    layers = resolve_layers(act.layers, n_model_layers)
    identity = {
        "model": model_fingerprint(cfg.model), "dtype": cfg.model.dtype, "layers": layers,
        "positions": sorted(act.positions), "storage_dtype": act.storage_dtype, "shard_rows": act.shard_rows,
        "inputs": inputs.digest(),
    }
    where = configured_store(act.store)
    remote = where if is_remote(where) else None
    return ActivationStore(store_root(where), store_key(identity), remote), layers, dim


def run_activations(cfg: RunConfig, paths: RunPaths) -> None:
    """Hidden states of all statements and probed sentences, from the store (extracting what it lacks)."""
    inputs = collect_inputs(paths, cfg.activations)
    if not inputs.keys:
        raise ValueError("no statements or sentences to extract activations for")
    store, layers, dim = open_store(cfg, inputs)
    with store.lock():  # a second run of the same key waits here, then finds the store complete
        if store.remote and not store.complete():
            store.mirror().pull()  # a store another machine finished arrives whole, meta.json last
        if store.complete() and store.remote and not store.mirror().complete():
            store.mirror().publish()  # finished here before the remote copy was (a run killed while publishing)
        if store.complete():
            log.info("activations: store hit %s (%d rows x %d layers): no model loaded", store.key,
                     store.meta()["n_rows"], len(layers))
        else:
            build_store(cfg, store, inputs, layers, dim)
    store.link_into(paths.activations, model_slug(cfg.model.name))

