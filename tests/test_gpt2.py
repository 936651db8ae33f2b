"""A model that is not a Llama: a tiny random GPT-2 (decoder blocks under `transformer.h`, fused attention
projections, learned positions) runs every stage, from extraction to the report."""

from __future__ import annotations

import json

import polars as pl
import pytest

from flows.execute import run_stage_with
from flows.stages import ORDER
from tasks.core.config import ModelConfig, RunConfig
from tasks.core.models import decoder_layers, embedded_tokenizer, load_model, model_shape
from tasks.core.storage import RunPaths


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 3-block, 64-wide random GPT-2 with the SmolLM2 tokenizer (any tokenizer serves a random model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = embedded_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=64, n_layer=3, n_head=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_gpt2_blocks_are_found_and_sized(tiny_gpt2):
    model = load_model(ModelConfig(name=tiny_gpt2))
    assert type(model).__name__ == "GPT2LMHeadModel"
    layers = decoder_layers(model)
    assert layers is model.transformer.h and len(layers) == 3
    assert model_shape(ModelConfig(name=tiny_gpt2)) == (3, 64)


def test_gpt2_runs_every_stage_to_a_report(tiny_gpt2, tmp_path):
    cfg = RunConfig.model_validate({
        "run": "gpt2", "runs_dir": str(tmp_path / "runs"), "limit": 40, "model": {"name": tiny_gpt2},
        "finetune": {"max_items": 2, "max_length": 192, "compile": False},
        "evaluate": {"max_new_tokens": 3, "bootstrap": 20, "methods": ["closed_book", "full_context", "cad", "clear"]},
    })
    for stage in ORDER:
        run_stage_with(stage, cfg, force=False)
    paths = RunPaths(tmp_path / "runs" / "gpt2")
    layers = pl.read_parquet(paths.table("probe_metrics"))["layer"].unique().sort().to_list()
    assert layers == [0, 1, 2]  # every block probed, its vectors from transformer.h
    predictions = pl.read_parquet(paths.table("predictions"))
    assert set(predictions["method"]) == {"closed_book", "full_context", "cad", "clear"}
    adapter = json.loads((paths.root / "adapters" / "clear" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["c_attn"]  # no Llama name exists here: peft's default for GPT-2
    assert paths.report.exists()
