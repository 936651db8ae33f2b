"""Activations stage: parity with HF hidden states, early exit, padding invariance, the Parquet cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from schemas.tables import SENTENCES, STATEMENTS, activations_schema
from tasks.activations.stage import (
    collect_texts,
    extract,
    fed_text,
    resolve_layers,
    run_activations,
)
from tasks.core.activation_store import ActivationStore
from tasks.core.config import ModelConfig
from tasks.core.models import decoder_layers, load_model, load_tokenizer
from tasks.core.storage import model_slug, text_key, write_parquet

TEXTS = [
    "Paris is the capital of France.",
    "Hi",
    "The quick brown fox jumps over the lazy dog, again and again, near the river bank.",
    "Beats Music is owned by Apple",
    "Toko Yasuda plays the guitar",
    "Apple",
    "The Eiffel Tower is located in Rome.",
]


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    cfg = ModelConfig(name=tiny_model)
    return load_model(cfg), load_tokenizer(cfg)


def hf_reference(model, tok, texts: list[str]) -> dict[int, np.ndarray]:
    """HF's own hidden_states[L + 1] at the last token, each text fed alone (the contract)."""
    out: dict[int, list[np.ndarray]] = {}
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            for layer in range(len(hidden) - 1):
                out.setdefault(layer, []).append(hidden[layer + 1][0, -1].float().numpy())
    return {layer: np.stack(v) for layer, v in out.items()}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_parity_with_hf_hidden_states(model_tok, padding_side):
    model, tok = model_tok
    ref = hf_reference(model, tok, TEXTS)
    got = extract(model, tok, TEXTS, layers=[0, 2, 3], batch_size=3, padding_side=padding_side)
    assert sorted(got) == [0, 2, 3]
    for layer in (0, 2, 3):  # 3 is the last layer: the final-norm output, HF's hidden_states[-1]
        assert got[layer].dtype == np.float32 and got[layer].shape == (len(TEXTS), 64)
        assert np.abs(got[layer] - ref[layer]).max() <= 1e-5, layer


def test_last_layer_is_after_final_norm(model_tok):
    model, tok = model_tok
    blocks = decoder_layers(model)
    raw = {}
    handle = blocks[-1].register_forward_hook(lambda m, i, o: raw.setdefault("x", o[0] if isinstance(o, tuple) else o))
    try:
        got = extract(model, tok, TEXTS[:1], layers=[3])
    finally:
        handle.remove()
    pre_norm = raw["x"][0, -1].numpy()
    assert not np.allclose(got[3][0], pre_norm, atol=1e-4)  # the norm really was applied


def test_padding_and_batching_do_not_change_vectors(model_tok):
    model, tok = model_tok
    alone = extract(model, tok, TEXTS, batch_size=1)
    for side in ("left", "right"):
        batched = extract(model, tok, TEXTS, batch_size=len(TEXTS), padding_side=side)
        for layer in alone:
            np.testing.assert_allclose(batched[layer], alone[layer], atol=1e-5)


def _count_calls(modules) -> tuple[dict[int, int], list]:
    counts = {i: 0 for i in range(len(modules))}

    def make(i):
        def hook(*_):
            counts[i] += 1

        return hook

    return counts, [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]


def test_early_exit_skips_later_layers_and_head(model_tok):
    model, tok = model_tok
    blocks = decoder_layers(model)
    counts, handles = _count_calls(list(blocks) + [model.get_output_embeddings(), model.get_decoder().norm])
    try:
        extract(model, tok, TEXTS, layers=[1], batch_size=4)  # 2 batches
        assert counts[0] == counts[1] == 2
        assert counts[2] == counts[3] == 0  # blocks after the deepest requested one never ran
        assert counts[4] == 0 and counts[5] == 0  # nor the LM head, nor the final norm
        for k in counts:
            counts[k] = 0
        extract(model, tok, TEXTS, layers=[1, 3], batch_size=4)  # last requested: whole base model
        assert counts[3] == 2 and counts[5] == 2
        assert counts[4] == 0  # still no LM head / logits
    finally:
        for h in handles:
            h.remove()


def test_resolve_layers():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers([3, 1, 1], 4) == [1, 3]
    with pytest.raises(ValueError, match="0..3"):
        resolve_layers([4], 4)


def _write_inputs(paths, statements: list[str], sentences: list[str], relevant: list[bool] | None = None) -> None:
    stmt_rows = [
        {"stmt_id": f"s{i}", "key": text_key(t), "text": t, "label": i % 2, "group": f"g{i}",
         "relation_id": "P1", "split": "train"}
        for i, t in enumerate(statements)
    ]
    sent_rows = [
        {"item_id": f"i{i // 2}", "sent_idx": i % 2, "key": text_key(t), "text": t, "char_start": 0,
         "char_end": len(t), "relevance": None, "label": None, "truthful": None,
         "is_relevant": None if relevant is None else relevant[i]}
        for i, t in enumerate(sentences)
    ]
    write_parquet(stmt_rows, paths.table("statements"), STATEMENTS)
    write_parquet(sent_rows, paths.table("sentences"), SENTENCES)


def test_run_activations_writes_cache_and_loads_aligned(tiny_cfg, run_paths, model_tok):
    model, tok = model_tok
    statements, sentences = TEXTS[:4], TEXTS[3:] + [TEXTS[4]]  # TEXTS[3] in both; TEXTS[4] twice
    _write_inputs(run_paths, statements, sentences)
    cfg = tiny_cfg.model_copy(update={"activations": tiny_cfg.activations.model_copy(update={"layers": [3, 1],
                                                                                              "batch_size": 2})})
    run_activations(cfg, run_paths)
    slug = model_slug(cfg.model.name)

    meta = json.loads((run_paths.activations / f"model={slug}" / "meta.json").read_text())
    assert meta["layers"] == [1, 3] and meta["dim"] == 64 and meta["n_keys"] == len(TEXTS)
    assert meta["n_statements"] == 4 and meta["n_sentences"] == 3 and meta["sentences_per_s"] > 0
    assert run_paths.activations == run_paths.root / "activations"
    assert not (run_paths.activations / f"model={slug}" / "layer=0").exists()

    store = ActivationStore.open(run_paths.activations, slug)
    (path,) = store.layer_files(1)  # one shard holds every text
    table = pq.read_table(path)
    assert table.schema.equals(activations_schema(64))
    assert table.num_rows == len(TEXTS) and len(set(table["key"].to_pylist())) == len(TEXTS)
    sources = dict(zip(table["key"].to_pylist(), table["source"].to_pylist()))
    assert sources[text_key(TEXTS[3])] == "statements" and sources[text_key(TEXTS[6])] == "sentences"
    assert set(table["position"].to_pylist()) == {"last"}
    meta_pq = pq.ParquetFile(path).metadata
    vec_col = [meta_pq.row_group(0).column(i) for i in range(meta_pq.num_columns)
               if meta_pq.row_group(0).column(i).path_in_schema.startswith("vector")][0]
    assert not vec_col.has_dictionary_page

    order = list(reversed(TEXTS))
    # keyed by the text, computed on what the model reads: the text without its final period
    ref = extract(model, tok, [fed_text(t, True) for t in order], layers=[1, 3], batch_size=1)
    for layer in (1, 3):
        got = store.vectors(layer, [text_key(t) for t in order])
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
        np.testing.assert_allclose(got, ref[layer], atol=1e-5)
    with pytest.raises(KeyError, match="no activation"):
        store.vectors(1, [text_key(TEXTS[0]), "missing-key"])
    with pytest.raises(KeyError, match=r"layer 0 is not in the activation store"):  # not extracted: no such layer
        store.vectors(0, [text_key(TEXTS[0])])


def test_fed_text_drops_only_the_closing_punctuation():
    assert fed_text("Paris is the capital of France.", True) == "Paris is the capital of France"
    assert fed_text("Is it?  ", True) == "Is it"
    assert fed_text("Mario Bros.", False) == "Mario Bros."
    assert fed_text("...", True) == "..."  # nothing would be left: keep the text


def relevant_cfg(cfg, **activations):
    """A config that probes only the units the relevance filter kept."""
    return cfg.model_copy(update={
        "decompose": cfg.decompose.model_copy(update={"relevance": True}),
        "activations": cfg.activations.model_copy(update={"sentences": "relevant", **activations}),
    })


def test_relevant_mode_extracts_only_relevant_sentences(tiny_cfg, run_paths):
    statements, sentences = TEXTS[:2], TEXTS[2:]
    relevant = [True, False, None, True, False]  # None (not scored) counts as not relevant
    _write_inputs(run_paths, statements, sentences, relevant)
    assert collect_texts(run_paths)[1] == TEXTS  # the default probes every sentence, as before
    keys, texts, sources = collect_texts(run_paths, "relevant")
    assert texts == TEXTS[:2] + [TEXTS[2], TEXTS[5]] and sources == ["statements"] * 2 + ["sentences"] * 2

    run_activations(relevant_cfg(tiny_cfg, layers=[0]), run_paths)
    slug = model_slug(tiny_cfg.model.name)
    table = pq.read_table(ActivationStore.open(run_paths.activations, slug).layer_files(0))
    assert sorted(table["key"].to_pylist()) == sorted(keys)
    meta = json.loads((run_paths.activations / f"model={slug}" / "meta.json").read_text())
    assert meta["sentences"] == "relevant" and meta["n_sentences"] == 2

    _write_inputs(run_paths, statements, sentences)  # relevance never computed
    with pytest.raises(ValueError, match="decompose.relevance=true"):
        collect_texts(run_paths, "relevant")
