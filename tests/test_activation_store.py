"""Activation store: sentence-in-context parity, content-addressed hits, resume after a kill, float16 storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

import tasks.activations.stage as acts
from schemas.tables import ITEMS, SENTENCES, STATEMENTS
from tasks.core.activation_store import DUCKDB_HIVE, ActivationStore, Shard, plan_shards, tree_glob, vectors_table
from tasks.activations.stage import collect_inputs, iter_context_activations, open_store, run_activations
from tasks.core.config import ModelConfig, RunConfig
from tasks.activations.extraction import span_tokens
from tasks.core.models import load_model, load_tokenizer
from tasks.core.quality import validate
from tasks.core.splitter import split_sentences
from tasks.core.storage import RunPaths, model_slug, text_key, write_parquet

CONTEXTS = [
    "Paris is the capital of France. The Nile flows through Egypt. Toko Yasuda plays the guitar.",
    "Beats Music is owned by Apple. The Eiffel Tower is located in Rome.",
    "Mount Everest is the highest mountain on Earth, and it lies in the Himalayas. It is tall.",
]


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    cfg = ModelConfig(name=tiny_model)
    return load_model(cfg), load_tokenizer(cfg)


def write_run(paths: RunPaths, contexts: list[str], statements: list[str]) -> None:
    """items, sentences (exact spans) and statements for the activations stage."""
    items, sents = [], []
    for n, ctx in enumerate(contexts):
        items.append({"item_id": f"i{n}", "dataset": "x", "split": "test", "group": f"g{n}", "question": "Q?",
                      "context": ctx, "answers": ["a"], "counterfactual": True})
        for idx, (text, start, end) in enumerate(split_sentences(ctx)):
            sents.append({"item_id": f"i{n}", "sent_idx": idx, "key": text_key(text), "text": text,
                          "char_start": start, "char_end": end, "unit": "sentence", "source_idx": idx})
    stmts = [{"stmt_id": f"s{i}", "key": text_key(t), "text": t, "label": i % 2, "group": f"s{i}", "split": "train"}
             for i, t in enumerate(statements)]
    write_parquet(items, paths.table("items"), ITEMS)
    write_parquet(sents, paths.table("sentences"), SENTENCES)
    write_parquet(stmts, paths.table("statements"), STATEMENTS)


def with_act(cfg: RunConfig, **update) -> RunConfig:
    return cfg.model_copy(update={"activations": cfg.activations.model_copy(update=update)})


def _meta_path(paths: RunPaths, cfg: RunConfig) -> Path:
    return paths.activations / f"model={model_slug(cfg.model.name)}" / "meta.json"


def test_sentence_in_context_parity_with_hf_hidden_states(model_tok):
    """ctx_last / ctx_mean equal HF's hidden_states[L + 1] of the whole context at the span's tokens (fp32)."""
    model, tok = model_tok
    spans = [[(s, e) for _, s, e in split_sentences(c)] for c in CONTEXTS]
    got_last: dict[int, list] = {}
    got_mean: dict[int, list] = {}
    order = []
    for batch, last, mean in iter_context_activations(model, tok, CONTEXTS, spans, [0, 2, 3], batch_size=2,
                                                      progress=False):
        order += [(i, j) for i in batch for j in range(len(spans[i]))]
        for layer in last:
            got_last.setdefault(layer, []).append(last[layer])
            got_mean.setdefault(layer, []).append(mean[layer])
    with torch.inference_mode():
        for layer in (0, 2, 3):
            ref_last, ref_mean = {}, {}
            for i, ctx in enumerate(CONTEXTS):
                enc = tok(ctx, return_offsets_mapping=True, return_tensors="pt")
                offsets = enc.pop("offset_mapping")[0].tolist()
                hidden = model(**enc, output_hidden_states=True).hidden_states[layer + 1][0]
                for j, (s, e) in enumerate(spans[i]):
                    toks = span_tokens(offsets, s, e)
                    ref_last[(i, j)], ref_mean[(i, j)] = hidden[toks[-1]].numpy(), hidden[toks].mean(0).numpy()
            assert np.abs(np.concatenate(got_last[layer]) - np.stack([ref_last[k] for k in order])).max() <= 1e-5
            assert np.abs(np.concatenate(got_mean[layer]) - np.stack([ref_mean[k] for k in order])).max() <= 1e-5


def test_store_holds_every_position_once_and_passes_its_suite(tiny_cfg, run_paths):
    write_run(run_paths, CONTEXTS, ["Paris is the capital of France.", "Paris is the capital of Spain."])
    cfg = with_act(tiny_cfg, positions=["last", "ctx_last", "ctx_mean"], shard_rows=3, layers=[1, 3])
    run_activations(cfg, run_paths)
    layer_dir = run_paths.activations / f"model={model_slug(cfg.model.name)}" / "layer=1"
    table = pl.from_arrow(pq.read_table(layer_dir))
    n_sent = sum(len(split_sentences(c)) for c in CONTEXTS)
    n_last = n_sent + 1  # the first statement is also a context sentence: stored once
    assert table.group_by("position").len().sort("position").rows() == [
        ("ctx_last", n_sent), ("ctx_mean", n_sent), ("last", n_last)]
    assert table.select("key", "position", "context_key").n_unique() == table.height
    assert len(list(layer_dir.glob("part-*.parquet"))) > 2  # several shards of <= 3 rows' inputs
    assert validate("activations", run_paths)["success"]


def test_second_run_loads_no_model_and_the_store_is_shared(tiny_cfg, run_paths, monkeypatch, tmp_path):
    write_run(run_paths, CONTEXTS, ["Paris is the capital of France."])
    cfg = with_act(tiny_cfg, layers=[0, 2])
    run_activations(cfg, run_paths)
    first = json.loads(_meta_path(run_paths, cfg).read_text())

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(acts, "load_model", no_model)
    monkeypatch.setattr(acts, "load_tokenizer", no_model)
    other = RunPaths(tmp_path / "other-run")
    write_run(other, CONTEXTS, ["Paris is the capital of France."])
    run_activations(cfg.model_copy(update={"run": "other-run"}), other)  # no model: load_model would raise
    second = json.loads(_meta_path(other, cfg).read_text())
    assert second == first
    keys = [text_key(t) for t, _, _ in split_sentences(CONTEXTS[0])]
    np.testing.assert_array_equal(ActivationStore.open(other.activations).vectors(2, keys),
                                  ActivationStore.open(run_paths.activations).vectors(2, keys))
    # a changed input is another store: extracting it would need the model
    write_run(other, CONTEXTS[:2], ["Paris is the capital of France."])
    with pytest.raises(AssertionError, match="model was loaded"):
        run_activations(cfg, other)


def test_resume_redoes_only_the_unfinished_shard(tiny_cfg, run_paths):
    write_run(run_paths, CONTEXTS, [f"Statement number {i} is here." for i in range(7)])
    cfg = with_act(tiny_cfg, shard_rows=4, layers=[0, 3])
    run_activations(cfg, run_paths)
    store, layers, _ = open_store(cfg, collect_inputs(run_paths, cfg.activations))
    shards = plan_shards(collect_inputs(run_paths, cfg.activations), cfg.activations.positions, 4)
    assert len(shards) >= 3
    before = {p: p.stat().st_ino for p in store.dir.rglob("part-*.parquet")}
    # a kill after layer 0 of the second shard was written, with a temp file of layer 3 half done
    (store.layer_dir(3) / shards[1].name).unlink()
    (store.layer_dir(3) / f".{shards[1].name}.x.tmp").write_bytes(b"half a shard")
    store.meta_path.unlink()
    run_activations(cfg, run_paths)
    after = {p: p.stat().st_ino for p in store.dir.rglob("part-*.parquet")}
    redone = {p for p in after if before.get(p) != after[p]}
    assert redone == {store.layer_dir(0) / shards[1].name, store.layer_dir(3) / shards[1].name}
    assert not list(store.dir.rglob("*.tmp")) and store.complete()


def test_float16_storage_halves_the_vectors(tiny_cfg, run_paths):
    write_run(run_paths, CONTEXTS, ["Paris is the capital of France."])
    slug = model_slug(tiny_cfg.model.name)
    keys = [text_key(t) for t, _, _ in split_sentences(CONTEXTS[0])]
    run_activations(with_act(tiny_cfg), run_paths)
    full = ActivationStore.open(run_paths.activations, slug).vectors(1, keys)
    run_activations(with_act(tiny_cfg, storage_dtype="float16"), run_paths)
    half = ActivationStore.open(run_paths.activations, slug).vectors(1, keys)
    assert half.dtype == np.float32 and np.abs(half - full).max() <= 1e-2 * np.abs(full).max()
    field = pq.read_schema(next((run_paths.activations / f"model={slug}" / "layer=1").glob("*.parquet"))).field("vector")
    assert str(field.type.value_type) == "halffloat"
    assert validate("activations", run_paths)["success"]  # DuckDB reads the float16 files (the suite's route)


DIM = 6
LAST_KEYS = [f"k{i}" for i in range(7)]
CTX_ROWS = [("k0", "c0"), ("k1", "c0"), ("k0", "c1")]  # (sentence key, context key): k0 is read in two contexts


def write_synthetic_store(root: Path, storage_dtype: str) -> ActivationStore:
    """A finished store written by the writer without a model: per layer two 'last' shards and a ctx_last shard."""
    store = ActivationStore(root, "synthetic")
    rng = np.random.default_rng(7)
    shards = [Shard("last", 0, 0, 4), Shard("last", 1, 4, 7), Shard("ctx", 0, 0, 2)]
    for layer in (1, 4):
        last, ctx = rng.normal(size=(len(LAST_KEYS), DIM)), rng.normal(size=(len(CTX_ROWS), DIM))
        for shard in shards[:2]:
            keys, rows = LAST_KEYS[shard.start : shard.stop], last[shard.start : shard.stop]
            store.write_shard(shard, {layer: vectors_table(keys, ["statements"] * len(keys), rows, "last", None,
                                                           storage_dtype)})
        store.write_shard(shards[2], {layer: vectors_table([k for k, _ in CTX_ROWS], ["sentences"] * len(CTX_ROWS), ctx,
                                                           "ctx_last", [c for _, c in CTX_ROWS], storage_dtype)})
    rows = {"last": len(LAST_KEYS), "ctx_last": len(CTX_ROWS)}
    store.verify([1, 4], shards, rows)
    store.finish({"slug": "synthetic-model", "layers": [1, 4], "dim": DIM, "positions": ["last", "ctx_last"],
                  "storage_dtype": storage_dtype, "rows_by_position": rows})
    return store


def read_directly(layer_glob: str, position: str) -> dict[tuple[str, str | None], np.ndarray]:
    """(key, context key) -> vector, read by DuckDB straight from the Parquet files (not through the store)."""
    sql = "select key, context_key, vector from read_parquet($files) where position = $position"
    rows = duckdb.sql(sql, params={"files": layer_glob, "position": position}).fetchall()
    return {(key, ctx): np.asarray(vector, dtype=np.float32) for key, ctx, vector in rows}


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_reader_returns_the_stored_vectors_in_the_order_asked(tmp_path, storage_dtype):
    """A store directory and a run's linked tree give the files' own vectors, row i for keys[i] (repeats too)."""
    written = write_synthetic_store(tmp_path / "store", storage_dtype)
    activations = tmp_path / "run" / "activations"
    written.link_into(activations, "synthetic-model")
    opened = {"store dir": ActivationStore.open(written.dir), "run tree": ActivationStore.open(activations),
              "run tree, by model": ActivationStore.open(activations, model="synthetic-model")}
    keys = ["k5", "k0", "k3", "k0", "k6", "k1", "k2", "k4"]
    for where, store in opened.items():
        assert store.slug == "synthetic-model" and store.layers == [1, 4] and store.dim == DIM, where
        assert store.storage_dtype == storage_dtype and store.positions == ["last", "ctx_last"], where
        assert [p.name for p in store.layer_files(4)] == sorted(p.name for p in (store.dir / "layer=4").iterdir())
        for layer in (1, 4):
            got = store.vectors(layer, keys)
            direct = read_directly(f"{store.dir}/layer={layer}/*.parquet", "last")
            assert got.dtype == np.float32 and got.shape == (len(keys), DIM), where
            np.testing.assert_array_equal(got, np.stack([direct[(k, None)] for k in keys]), err_msg=where)
            asked = list(reversed(CTX_ROWS))
            got = store.vectors(layer, [k for k, _ in asked], "ctx_last", context_keys=[c for _, c in asked])
            direct = read_directly(f"{store.dir}/layer={layer}/*.parquet", "ctx_last")
            np.testing.assert_array_equal(got, np.stack([direct[row] for row in asked]), err_msg=where)
            assert store.vectors(layer, []).shape == (0, DIM)
    tree = duckdb.sql(f"select distinct model, layer from read_parquet('{tree_glob(activations)}', {DUCKDB_HIVE}) "
                      "order by layer").fetchall()
    assert tree == [("synthetic-model", 1), ("synthetic-model", 4)]  # the glob DuckDB reads, typed partitions


def test_reader_names_what_the_store_does_not_hold(tmp_path):
    """An unknown layer, position, key or context is a clear error naming it; an unfinished store does not open."""
    store = ActivationStore.open(write_synthetic_store(tmp_path / "store", "float32").dir)
    with pytest.raises(KeyError, match=r"layer 2 is not in the activation store .*layers \[1, 4\]"):
        store.vectors(2, ["k0"])
    with pytest.raises(KeyError, match=r"position 'ctx_mean' is not in .*positions \['last', 'ctx_last'\]"):
        store.vectors(1, ["k0"], "ctx_mean", context_keys=["c0"])
    with pytest.raises(KeyError, match=r"2 keys have no activation at layer 1, position 'last'.*'nope', 'gone'"):
        store.vectors(1, ["k0", "nope", "k1", "gone"])
    with pytest.raises(KeyError, match=r"1 keys have no activation .*\('k1', 'c1'\)"):  # k1 was never read in c1
        store.vectors(1, ["k0", "k1"], "ctx_last", context_keys=["c1", "c1"])
    with pytest.raises(ValueError, match="context_keys"):  # k0 has two ctx_last rows: a key alone is ambiguous
        store.vectors(1, ["k0"], "ctx_last")
    with pytest.raises(ValueError, match="context_keys"):
        store.vectors(1, ["k0"], "last", context_keys=["c0"])
    with pytest.raises(FileNotFoundError, match="run the activations stage"):
        ActivationStore.open(tmp_path / "nowhere")
    store.meta_path.unlink()  # an unfinished store
    with pytest.raises(FileNotFoundError, match="meta.json does not exist"):
        ActivationStore.open(store.dir)


def test_a_run_tree_with_two_models_needs_the_model_named(tmp_path):
    activations = tmp_path / "activations"
    for slug in ("model-a", "model-b"):
        write_synthetic_store(tmp_path / slug, "float32").link_into(activations, slug)
    with pytest.raises(ValueError, match=r"2 models \(\['model=model-a', 'model=model-b'\]\): name one"):
        ActivationStore.open(activations)
    assert ActivationStore.open(activations, "model-b").dir == activations / "model=model-b"
    assert [s.slug for s in ActivationStore.tree(activations)] == ["model-a", "model-b"]


_CHILD = textwrap.dedent(
    """
    import sys
    from tasks.activations.stage import run_activations
    from tasks.core.config import RunConfig
    from tasks.core.storage import RunPaths
    cfg = RunConfig.model_validate_json(open(sys.argv[1]).read())
    run_activations(cfg, RunPaths(cfg.runs_dir / cfg.run))
    """
)


def test_kill_9_mid_extraction_then_rerun_completes_without_duplicates(tiny_cfg, tmp_path):
    """A SIGKILLed extraction keeps its finished shards; the same command then completes the store exactly."""
    paths = RunPaths(Path(tiny_cfg.runs_dir) / tiny_cfg.run)
    statements = [f"Fact number {i} says that river {i % 97} flows to the north." for i in range(3000)]
    write_run(paths, CONTEXTS, statements)
    cfg = with_act(tiny_cfg, batch_size=1, shard_rows=100, layers=[1, 2])
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.model_dump_json())
    env = {**os.environ, "CLEARFLOW_STORE": str(tmp_path / "store"), "PYTHONPATH": str(Path(__file__).parents[1])}
    store, layers, _ = open_store(cfg.model_copy(update={"activations": cfg.activations.model_copy(
        update={"store": tmp_path / "store"})}), collect_inputs(paths, cfg.activations))
    out = tmp_path / "child.log"  # the child's output, shown when the kill misses
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(cfg_file)], env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while len(list(store.layer_dir(2).glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, f"the child ended before the kill:\n{out.read_text()}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    survived = {p: p.stat().st_ino for p in store.dir.rglob("part-*.parquet")}
    assert survived and not store.complete(), f"the kill must land mid-extraction; the child said:\n{out.read_text()}"
    rerun = subprocess.run([sys.executable, "-c", _CHILD, str(cfg_file)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert store.complete() and not list(store.dir.rglob("*.tmp"))
    for layer in layers:
        table = pl.from_arrow(pq.read_table(store.layer_dir(layer)))
        assert table.height == len(set(statements) | {t for c in CONTEXTS for t, _, _ in split_sentences(c)})
        assert table["key"].n_unique() == table.height
    kept = [p for p, ino in survived.items() if p.exists() and p.stat().st_ino == ino]
    assert len(kept) >= len(survived) - len(layers)  # finished shards were not recomputed (one may have been partial)


def test_two_extractions_of_one_key_at_once_build_one_store(tiny_cfg, tmp_path):
    """Two runs extracting the same key at the same moment: the second waits for the first's lock (and says so),
    then finds the store complete; the store is whole, verified, with no duplicate and no temp file."""
    statements = [f"Fact number {i} says that river {i % 97} flows to the north." for i in range(2000)]
    cfg = with_act(tiny_cfg, batch_size=1, shard_rows=100, layers=[1, 2])  # slow enough for the two to overlap
    env = {**os.environ, "CLEARFLOW_STORE": str(tmp_path / "store"), "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = []
    for run in ("a", "b"):
        run_cfg = cfg.model_copy(update={"run": run})
        write_run(RunPaths(Path(run_cfg.runs_dir) / run), CONTEXTS, statements)
        cfg_file = tmp_path / f"{run}.json"
        cfg_file.write_text(run_cfg.model_dump_json())
        procs.append(subprocess.Popen([sys.executable, "-c", _LOGGED_CHILD, str(cfg_file)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("another process is writing it; waiting" in out for out in outputs) == 1, outputs
    assert sum("store hit" in out for out in outputs) == 1, outputs  # the waiter loaded no model
    (key,) = [d.name for d in (tmp_path / "store").iterdir() if d.is_dir()]  # one store directory
    store = ActivationStore(tmp_path / "store", key)
    assert store.complete() and not list((tmp_path / "store").rglob("*.tmp"))
    for layer in (1, 2):
        table = pl.from_arrow(pq.read_table(store.layer_dir(layer)))
        assert table["key"].n_unique() == table.height >= len(statements)


_LOGGED_CHILD = "import logging\nlogging.basicConfig(level=logging.INFO, format='%(message)s')\n" + _CHILD


def test_a_store_that_cannot_fit_is_refused_before_any_model_loads(tiny_cfg, tmp_path, monkeypatch):
    """The disk check: with less free space than the store's estimate, one error naming the need, the free space
    and the ways out; no model loaded, no shard written. With room, the same run goes on (so the check can fail)."""
    paths = RunPaths(Path(tiny_cfg.runs_dir) / tiny_cfg.run)
    write_run(paths, CONTEXTS, ["Paris is in France.", "Rome is in Spain."])
    cfg = with_act(tiny_cfg, store=tmp_path / "store")
    real = acts.shutil.disk_usage
    monkeypatch.setattr(acts.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    monkeypatch.setattr(acts, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RuntimeError, match=r"the activation store needs up to .* but .* has 1000 ?B free: request "
                                           r"fewer layers, float16 storage, or another --activations.store"):
        run_activations(cfg, paths)
    assert not list((tmp_path / "store").rglob("*.parquet"))

    monkeypatch.undo()  # room again: the same run extracts
    run_activations(cfg, paths)
    assert list((tmp_path / "store").rglob("part-*.parquet"))
