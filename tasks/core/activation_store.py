"""A content-addressed, sharded, resumable store of hidden states, shared by every run, and its one reader.

Key = model fingerprint + dtype + layers + positions + storage type + shard size + hash of the inputs
(texts as fed, contexts and sentence spans). A store directory is ``<store>/<key>/layer=<L>/part-<kind>-<i>.parquet``
plus ``meta.json``, which is written last: its presence means the store is complete, so a hit needs no model.
Shards cover fixed, deterministic slices of the inputs; each layer file is written atomically, so after a kill the
finished shards stay, a half-written one is redone, and temp files are swept on restart.

A run links its store into ``activations/model=<slug>/`` (the same layout, hive-partitioned by model and layer).
This module is the only one that knows that layout: consumers open a finished store with `ActivationStore.open`
and ask it for its metadata, vectors (`vectors`) or files (`files`, `layer_files`, `tree_glob` for DuckDB).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.tables import activations_schema
from tasks.core.remote_store import Remote, is_remote, mirror_root
from tasks.core.storage import atomic_path, cache_root, key_lock, model_slug, write_json

STORE_FORMAT = 1  # bump when the layout or the meaning of a stored vector changes
VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16}
CTX_POSITIONS = ("ctx_last", "ctx_mean")
SUBJECT_LAST = "subject_last"  # a statement fed alone, the state at its subject's last token (extracted with 'last')
SHARD_GLOB = "part-*.parquet"  # a layer's files; temp files (".part-*.tmp") never match
HIVE_TYPES = {"model": "VARCHAR", "layer": "INTEGER"}  # partition keys of a run tree's paths, as DuckDB types them
DUCKDB_HIVE = f"hive_partitioning = true, hive_types = {{{', '.join(f'{k!r}: {t}' for k, t in HIVE_TYPES.items())}}}"


def model_dir(activations: Path, slug: str) -> Path:
    """Where a model's store is linked inside a run's activations/ tree."""
    return Path(activations) / f"model={slug}"


def tree_glob(activations: Path | str) -> str:
    """Every shard of every model under a run's activations/ tree (absolute or relative), as DuckDB's glob."""
    return f"{Path(activations).as_posix()}/model=*/layer=*/{SHARD_GLOB}"


@dataclass
class StoreInputs:
    """What gets extracted: texts fed alone (position last) and contexts with their sentence spans (ctx_*)."""

    keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # as fed to the model
    sources: list[str] = field(default_factory=list)
    context_keys: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    units: list[list[tuple[str, int, int]]] = field(default_factory=list)  # per context: (key, start, end)
    # subject_last: (row of keys/texts, start, end) of the subject's characters in the text as fed
    subjects: list[tuple[int, int, int]] = field(default_factory=list)

    def digest(self) -> str:
        """Hash of everything the vectors depend on besides the model and options."""
        h = hashlib.sha256()
        for k, t, s in zip(self.keys, self.texts, self.sources):
            h.update(f"L\0{k}\0{s}\0{t}\n".encode())
        for ck, c, us in zip(self.context_keys, self.contexts, self.units):
            h.update(f"C\0{ck}\0{c}\0{json.dumps(us)}\n".encode())
        if self.subjects:  # absent before subject_last existed: earlier stores keep their keys
            h.update(f"S\0{json.dumps(self.subjects)}\n".encode())
        return h.hexdigest()

    def for_shard(self, shard: Shard) -> tuple[StoreInputs, Shard]:
        """Only what one shard reads, with the shard re-based onto it (same name): what a remote worker is sent
        instead of every input."""
        if shard.kind == "last":
            part = StoreInputs(keys=self.keys[shard.start : shard.stop], texts=self.texts[shard.start : shard.stop],
                               sources=self.sources[shard.start : shard.stop],
                               subjects=[(row - shard.start, s, e) for row, s, e in self.subjects
                                         if shard.start <= row < shard.stop])
        else:
            part = StoreInputs(context_keys=self.context_keys[shard.start : shard.stop],
                               contexts=self.contexts[shard.start : shard.stop],
                               units=self.units[shard.start : shard.stop])
        return part, Shard(shard.kind, shard.index, 0, shard.stop - shard.start)

    def n_rows(self, positions: Sequence[str]) -> dict[str, int]:
        """Rows per position kind this input yields (per layer)."""
        n_units = sum(len(u) for u in self.units)
        per = {"last": len(self.keys), SUBJECT_LAST: len(self.subjects)}
        return {p: per.get(p, n_units) for p in positions}


@dataclass(frozen=True)
class Shard:
    """A fixed slice of the inputs: texts [start, stop) for kind 'last', contexts [start, stop) for 'ctx'."""

    kind: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.kind}-{self.index:05d}.parquet"


def plan_shards(inputs: StoreInputs, positions: Sequence[str], shard_rows: int) -> list[Shard]:
    """Deterministic shards of about shard_rows rows each (a context is never split across two)."""
    shards = [Shard("last", i, s, min(s + shard_rows, len(inputs.keys)))
              for i, s in enumerate(range(0, len(inputs.keys), shard_rows))]
    if any(p in CTX_POSITIONS for p in positions):
        start, rows = 0, 0
        for c, units in enumerate(inputs.units):
            rows += len(units)
            if rows >= shard_rows or c == len(inputs.units) - 1:
                shards.append(Shard("ctx", len([s for s in shards if s.kind == "ctx"]), start, c + 1))
                start, rows = c + 1, 0
    return shards


def configured_store(configured: str | Path | None = None) -> str:
    """The store root asked for: the configured path or URL, $CLEARFLOW_STORE, or the clearflow cache."""
    return str(configured or os.environ.get("CLEARFLOW_STORE") or cache_root() / "activations")


def store_root(configured: str | Path | None = None) -> Path:
    """Where stores live on this machine: the configured directory, or the local mirror of a remote store."""
    where = configured_store(configured)
    return mirror_root(where) if is_remote(where) else Path(where.removeprefix("file://")).expanduser()


def store_key(identity: dict[str, Any]) -> str:
    """Content address of a store from everything its vectors depend on."""
    blob = json.dumps({**identity, "format": STORE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def vectors_table(
    keys: list[str],
    sources: list[str],
    vectors: np.ndarray,
    position: str = "last",
    context_keys: list[str] | None = None,
    storage_dtype: str = "float32",
) -> pa.Table:
    """One Arrow table of rows with a fixed-size-list vector column (no Python floats)."""
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=NUMPY_TYPES[storage_dtype]).reshape(-1))
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "source": pa.array(sources, pa.string()),
            "position": pa.array([position] * len(keys), pa.string()),
            "context_key": pa.array(context_keys if context_keys is not None else [None] * len(keys), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        },
        schema=activations_schema(dim, VALUE_TYPES[storage_dtype]),
    )


def write_shard_file(table: pa.Table, path: Path) -> None:
    """One layer's file of a shard, atomically; byte-stream split compresses float32 vectors best (float16 ones are
    written plain: DuckDB cannot read byte-stream-split float16, and the suite and the catalog read with DuckDB)."""
    split = ["vector.list.element"] if table.schema.field("vector").type.value_type == pa.float32() else False
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["source", "position", "context_key"],
                       use_byte_stream_split=split)


@dataclass(frozen=True)
class ActivationStore:
    """One store directory, `root/key`: a content-addressed store (key = its content key) or a run's linked copy
    (root = the run's activations/, key = ``model=<slug>``). The writer fills it shard by shard; readers `open` it.
    A store with a `remote` URL is the local mirror of `<remote>/<key>` (tasks/core/remote_store.py): every shard
    written is also uploaded."""

    root: Path
    key: str
    remote: str | None = None

    @classmethod
    def open(cls, path: Path | str, model: str | None = None) -> ActivationStore:
        """A finished store to read: a store directory, or a run's activations/ tree (`model`: which model's, by
        name or slug; needed only when the tree holds several)."""
        where = _store_dir(Path(path), model)
        store = cls(where.parent, where.name)
        if not store.complete():
            raise FileNotFoundError(f"{store.meta_path} does not exist: {where} is not a finished activation store; "
                                    "run the activations stage first")
        return store

    @classmethod
    def tree(cls, activations: Path) -> list[ActivationStore]:
        """Every model's store linked in a run's activations/ tree, finished or not (a check reports the latter)."""
        return [cls(Path(activations), d.name) for d in sorted(Path(activations).glob("model=*")) if d.is_dir()]

    @property
    def dir(self) -> Path:
        return self.root / self.key

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def complete(self) -> bool:
        return self.meta_path.exists()

    def layer_dir(self, layer: int) -> Path:
        return self.dir / f"layer={layer}"

    # ------------------------------------------------------------------ reading

    def meta(self) -> dict[str, Any]:
        """meta.json as written (every field; the properties below type the common ones)."""
        return json.loads(self.meta_path.read_text())

    @property
    def slug(self) -> str:
        """The model's slug: its ``model=<slug>`` directory in a run's tree, else what meta.json records."""
        return self.key.split("=", 1)[1] if self.key.startswith("model=") else self.meta()["slug"]

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.meta()["layers"]]

    @property
    def dim(self) -> int:
        return int(self.meta()["dim"])

    @property
    def storage_dtype(self) -> str:
        return self.meta().get("storage_dtype", "float32")

    @property
    def rows_by_position(self) -> dict[str, int]:
        """Rows per position in each layer (stores written before positions existed: n_keys 'last' rows)."""
        meta = self.meta()
        return dict(meta.get("rows_by_position") or {"last": meta["n_keys"]})

    @property
    def positions(self) -> list[str]:
        meta = self.meta()
        return list(meta.get("positions") or meta.get("rows_by_position") or [meta.get("position", "last")])

    def layer_files(self, layer: int) -> list[Path]:
        """One layer's shard files, sorted."""
        return sorted(self.layer_dir(layer).glob(SHARD_GLOB))

    def files(self) -> list[Path]:
        """Every shard file of every layer, absolute and sorted (DuckDB reads `layer` from their paths)."""
        return sorted(self.dir.absolute().glob(f"layer=*/{SHARD_GLOB}"))

    def vectors(self, layer: int, keys: Sequence[str], position: str = "last",
                context_keys: Sequence[str] | None = None) -> np.ndarray:
        """float32 (len(keys), dim) of one layer and position, row i the vector of keys[i]; a context position
        (one row per sentence and context it was read in) also takes each row's context key."""
        in_context = position in CTX_POSITIONS
        if in_context != (context_keys is not None):
            raise ValueError(f"position {position!r} rows are keyed by {'key and context key' if in_context else 'key'}"
                             ": pass context_keys for the ctx_* positions, and only for them")
        table = self._position_rows(layer, position)
        keys = list(keys)
        wanted = _row_ids(pa.array(keys, pa.string()), context_keys)
        stored = _row_ids(table["key"], table["context_key"] if in_context else None)
        index = pc.index_in(wanted, value_set=stored)
        if index.null_count:
            at = pc.indices_nonzero(pc.is_null(index)).to_pylist()
            missing = [keys[i] if context_keys is None else (keys[i], context_keys[i]) for i in at]
            raise KeyError(
                f"{len(missing)} keys have no activation at layer {layer}, position {position!r}, in {self.dir} "
                f"(e.g. {missing[:3]}): re-run the activations stage on the current statements and sentences")
        dim = table.schema.field("vector").type.list_size
        vectors = table["vector"].take(index).combine_chunks().flatten()
        return vectors.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)

    def _position_rows(self, layer: int, position: str) -> pa.Table:
        """key, context_key and vector of one layer's rows at one position (a clear error for what is not stored)."""
        layers, positions = self.layers, self.positions
        if layer not in layers:
            raise KeyError(f"layer {layer} is not in the activation store {self.dir} (layers {layers}): "
                           "run the activations stage with it")
        if position not in positions:
            raise KeyError(f"position {position!r} is not in the activation store {self.dir} (positions {positions})")
        files = self.layer_files(layer)
        if not files:
            raise FileNotFoundError(f"{self.layer_dir(layer)} holds no shard: run the activations stage again")
        return ds.dataset(files, format="parquet").to_table(columns=["key", "context_key", "vector"],
                                                            filter=pc.field("position") == position)

    # ------------------------------------------------------------------ writing

    def shard_done(self, shard: Shard, layers: Sequence[int]) -> bool:
        """Every layer's file of the shard exists (each was renamed into place whole)."""
        return all((self.layer_dir(layer) / shard.name).exists() for layer in layers)

    def lock(self):
        """The store's writer lock (a file beside its directory): one process builds a key at a time."""
        return key_lock(self.root / f".{self.key}.lock", f"activation store {self.key}")

    def sweep_partials(self) -> int:
        """Remove temp files a killed writer left behind; returns how many."""
        stale = list(self.dir.rglob(".*.tmp")) if self.dir.exists() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def write_shard(self, shard: Shard, tables: dict[int, pa.Table]) -> None:
        for layer, table in tables.items():
            write_shard_file(table, self.layer_dir(layer) / shard.name)
        if self.remote:  # uploaded while the next shard is computed; the writer waits before it verifies
            self.mirror().push_later(*(f"layer={layer}/{shard.name}" for layer in tables))

    def mirror(self) -> Remote:
        """The remote copy this store mirrors (a store with a remote URL)."""
        return Remote(str(self.remote), self.key, self.dir)

    def verify(self, layers: Sequence[int], shards: Sequence[Shard], expected: dict[str, int]) -> None:
        """Refuse to finish a store with a missing shard, a duplicate row or a row count off the inputs."""
        want = sum(expected.values())
        for layer in layers:
            names = {p.name for p in self.layer_files(layer)}
            missing = [s.name for s in shards if s.name not in names]
            table = pq.read_table(self.layer_dir(layer), columns=["key", "position", "context_key"])
            ids = pc.binary_join_element_wise(table["key"], table["position"],
                                              pc.fill_null(table["context_key"], ""), "|")
            n_unique = len(pc.unique(ids))
            if missing or table.num_rows != want or n_unique != table.num_rows:
                raise RuntimeError(
                    f"activation store {self.dir} layer {layer}: {table.num_rows} rows ({n_unique} distinct) for "
                    f"{want} expected, missing shards {missing[:3]}: delete the directory and run again"
                )

    def finish(self, meta: dict[str, Any]) -> Path:
        """Mark the store complete (meta.json last)."""
        return write_json(meta, self.meta_path)

    def link_into(self, activations: Path, slug: str) -> Path:
        """Link the store into a run's activations/ tree (hard links, or copies across file systems)."""
        target = model_dir(activations, slug)
        tmp = target.parent / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for src in self.files():
            dst = tmp / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        shutil.copyfile(self.meta_path, tmp / "meta.json")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target / "meta.json"


def _store_dir(path: Path, model: str | None) -> Path:
    """The store directory a path names: itself, or one model's in a run's activations/ tree."""
    if model is not None:
        return model_dir(path, model_slug(model))
    if (path / "meta.json").exists():
        return path
    models = sorted(d.name for d in path.glob("model=*") if d.is_dir())
    if len(models) > 1:
        raise ValueError(f"{path} holds the activation stores of {len(models)} models ({models}): name one")
    return path / models[0] if models else path


def _row_ids(keys: pa.Array | pa.ChunkedArray, context_keys: Sequence[str] | pa.ChunkedArray | None) -> pa.Array:
    """A row's identity: its key, or its key and context key for a row read in a context."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if context_keys is None:
        return keys
    if isinstance(context_keys, pa.ChunkedArray):
        ctx = context_keys.combine_chunks()
    else:
        ctx = pa.array(list(context_keys), pa.string())
    return pc.binary_join_element_wise(keys, pc.fill_null(ctx, ""), "\x1f")


def disk_estimate(rows: int, n_layers: int, dim: int, storage_dtype: str) -> int:
    """Bytes a store will take on disk, before compression (keys and positions ~40 bytes a row)."""
    return rows * n_layers * (dim * np.dtype(NUMPY_TYPES[storage_dtype]).itemsize + 40)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"

