"""CAD and LFD on the tiny random model: each chosen token's scores against hand computations from plain forward
passes, batching against batch size 1, the IKS layer choice, and the evaluate stage running both."""

from __future__ import annotations

from functools import partial

import numpy as np
import polars as pl
import pytest
import torch
from scipy.special import log_softmax

import tasks.evaluate.decoding_loop as dl
import tasks.evaluate.stage as ev
from schemas.suites import SUITES
from schemas.tables import ITEMS, LFD_LAYERS
from tasks.activations.extraction import _block_output
from tasks.core.chat import encode, render
from tasks.core.config import ModelConfig
from tasks.core.models import load_model, load_tokenizer
from tasks.core.prompts import qa_messages
from tasks.core.storage import read_table, write_parquet
from tasks.evaluate.decoding import cad_scores, decode_cad
from tasks.evaluate.decoding_lfd import candidate_layers, choose_layer, decode_lfd, layer_iks
from tasks.evaluate.methods.closed_book import messages as question_only
from tasks.report import lfd_lines
from tests.test_evaluate import _item

QUESTIONS = ["Where is the Eiffel Tower?", "Who wrote the novel that everyone in the reading group talked about?",
             "What is the capital of Italy?", "Which river flows through the city where the old bridge stands?"]
CONTEXTS = ["The Eiffel Tower is in Rome.", "Berlin is in Germany. The novel was written by Ada Smith last year.",
            "Italy's capital is Milan, the old texts say.", "The Danube flows through it."]
ENDINGS = ["Rome", "Ada", "Milan", "Danube"]  # the random model repeats a prompt's last token: distinct answers
LAYER = 2  # the tiny model has 4 layers: the only latter-half candidate


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_model):
    cfg = ModelConfig(name=tiny_model)
    return load_model(cfg), load_tokenizer(cfg)


def _prompts(tok) -> tuple[list[str], list[str]]:
    """(full-context prompts, the same questions without context), of different token lengths, each ending in an
    answer word (after the chat template, every prompt would end alike and the random model answer alike)."""
    return ([render(tok, qa_messages(q, c)) + e for q, c, e in zip(QUESTIONS, CONTEXTS, ENDINGS)],
            [render(tok, question_only(q)) + e for q, e in zip(QUESTIONS, ENDINGS)])


def _last_logits(model, tok, prompt: str, generated: list[int]) -> torch.Tensor:
    """Next-token logits of one prompt plus tokens, from one plain forward pass (no cache, no padding)."""
    ids = torch.tensor([encode(tok, prompt)["input_ids"] + generated])
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, -1].float()


def test_cad_alpha_zero_is_plain_full_context_decoding(lm):
    model, tok = lm
    with_ctx, without = _prompts(tok)
    trace: dict = {}
    answers = decode_cad(model, tok, with_ctx, without, 0.0, max_new_tokens=5, batch_size=1, trace=trace)
    assert answers == ev.generate(model, tok, with_ctx, 5, 1) and all(answers)
    assert sum(len(steps) for steps in trace.values()) > len(with_ctx)  # tokens past the first were compared too
    for i, steps in trace.items():
        chosen = [int(s.argmax()) for s in steps]
        for t, scores in enumerate(steps):
            torch.testing.assert_close(scores, _last_logits(model, tok, with_ctx[i], chosen[:t]), rtol=0, atol=1e-5)
    a, b = _last_logits(model, tok, with_ctx[0], []), _last_logits(model, tok, without[0], [])
    assert torch.equal(cad_scores(a, b, 0.0), a)  # alpha 0 leaves the with-context logits bit for bit


def test_cad_first_step_is_the_hand_combination(lm):
    model, tok = lm
    with_ctx, without = _prompts(tok)
    trace: dict = {}
    decode_cad(model, tok, with_ctx, without, 0.5, max_new_tokens=3, batch_size=4, trace=trace)
    for i in range(len(with_ctx)):  # batched and left-padded, against two separate unpadded passes
        expected = 1.5 * _last_logits(model, tok, with_ctx[i], []) - 0.5 * _last_logits(model, tok, without[i], [])
        torch.testing.assert_close(trace[i][0], expected, rtol=0, atol=1e-5)


def _hand_lfd(model, tok, prompt: str, generated: list[int]) -> np.ndarray:
    """LFD's log-probabilities from HF's hidden states, RMS norm and LM head written out in numpy."""
    ids = torch.tensor([encode(tok, prompt)["input_ids"] + generated])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[LAYER + 1][0, -1].double().numpy()  # output of block LAYER
    weight = model.model.norm.weight.detach().double().numpy()
    normed = h / np.sqrt(np.mean(h**2) + model.config.rms_norm_eps) * weight
    layer_logits = model.lm_head.weight.detach().double().numpy() @ normed
    return log_softmax(out.logits[0, -1].double().numpy() + layer_logits)


def test_lfd_fused_distribution_is_the_hand_computation(lm):
    model, tok = lm
    with_ctx, _ = _prompts(tok)
    trace: dict = {}
    decode_lfd(model, tok, with_ctx, LAYER, max_new_tokens=3, batch_size=2, trace=trace)
    for i, steps in trace.items():
        chosen = [int(s.argmax()) for s in steps]
        for t, scores in enumerate(steps):  # the first step from the prompt, later ones through the KV cache
            np.testing.assert_allclose(scores.numpy(), _hand_lfd(model, tok, with_ctx[i], chosen[:t]), atol=1e-4)
    assert sum(len(steps) for steps in trace.values()) > len(with_ctx)


@pytest.mark.parametrize("method", ["cad", "lfd"])
def test_batches_give_the_answers_of_batch_one(lm, method, monkeypatch):
    """At batch 3 a prompt joins rows still answering; at batch 4 each prompt length is fed as its own group and
    the groups joined (CAD's two streams, LFD's captured hidden states): no answer or score changes."""
    model, tok = lm
    with_ctx, without = _prompts(tok)
    monkeypatch.setattr(dl, "length_groups", partial(dl.length_groups, slack=0, least=1))
    runs = []
    for batch_size in (1, 3, 4):
        trace: dict = {}
        if method == "cad":
            answers = decode_cad(model, tok, with_ctx, without, 0.5, 6, batch_size, trace=trace)
        else:
            answers = decode_lfd(model, tok, with_ctx, LAYER, 6, batch_size, trace=trace)
        runs.append((answers, trace))
    (one, trace_one), *batched_runs = runs
    assert len(set(one)) > 1  # distinct answers: each row kept its own prompt
    for batched, trace_batched in batched_runs:
        assert batched == one
        for i in range(len(with_ctx)):
            assert len(trace_batched[i]) == len(trace_one[i])
            for a, b in zip(trace_batched[i], trace_one[i]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_iks_layer_choice_is_the_lowest_of_the_latter_half():
    iks = [0.001, 0.002, 0.30, 0.25, 0.40, 0.05]  # layers 0, 1 and the final one are lower, but not candidates
    assert list(candidate_layers(6)) == [3, 4] and choose_layer(iks) == 3
    assert choose_layer([0.5, 0.5, 0.2, 0.1, 0.1, 0.3, 0.0]) == 3  # a tie goes to the shallower layer
    assert list(candidate_layers(4)) == [LAYER]
    with pytest.raises(ValueError, match="needs at least 3 decoder layers, the model has 2"):
        choose_layer([0.1, 0.2])


def _jsd(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))


def _hand_iks(model, tok, prompt: str, answer: str) -> list[float]:
    """Per layer, the mean JSD over the answer-predicting positions, the before-FFN state read as the input of each
    block's post-attention norm (another route than the stage's block output minus FFN output)."""
    p_ids, a_ids = encode(tok, prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
    blocks, before, after = model.model.layers, {}, {}
    hooks = [b.post_attention_layernorm.register_forward_pre_hook(
        lambda _m, args, i=i: before.__setitem__(i, args[0][0])) for i, b in enumerate(blocks)]
    hooks += [b.register_forward_hook(lambda _m, _a, out, i=i: after.__setitem__(i, _block_output(out)[0]))
              for i, b in enumerate(blocks)]
    with torch.inference_mode():
        model(input_ids=torch.tensor([p_ids + a_ids]))
    for h in hooks:
        h.remove()
    positions = range(len(p_ids) - 1, len(p_ids) + len(a_ids) - 1)

    def probs(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model.lm_head(model.model.norm(x)).double(), -1).numpy()

    return [float(np.mean([_jsd(probs(before[i][t]), probs(after[i][t])) for t in positions]))
            for i in range(len(blocks))]


def test_layer_iks_is_the_hand_computation(lm):
    model, tok = lm
    with_ctx, _ = _prompts(tok)
    answers = ["Rome", "Ada Smith", "Milan", "the Danube"]
    iks = layer_iks(model, tok, with_ctx, answers, batch_size=3)  # padded batches
    hand = np.mean([_hand_iks(model, tok, p, a) for p, a in zip(with_ctx, answers)], axis=0)
    np.testing.assert_allclose(iks, hand, rtol=1e-4, atol=1e-7)
    assert len(iks) == 4 and all(0 < v < np.log(2) for v in iks)


def _write_items(paths, splits: dict[str, range]) -> None:
    items = [_item(i, split) for split, ids in splits.items() for i in ids]
    write_parquet([{k: v for k, v in it.items() if k != "_sentences"} for it in items], paths.table("items"), ITEMS)


def _with_methods(cfg, methods: list[str], **evaluate):
    return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"methods": methods, **evaluate})})


def test_lfd_without_dev_items_is_refused(tiny_cfg, run_paths):
    _write_items(run_paths, {"test": range(3), "train": range(3, 5)})
    with pytest.raises(ValueError, match=r"LFD chooses its layer on the 'dev' split, which has no items \(splits "
                                         r"present: \['test', 'train'\]\)"):
        ev.run_evaluate(_with_methods(tiny_cfg, ["lfd"]), run_paths)


def test_evaluate_stage_runs_cad_and_lfd(tiny_cfg, run_paths):
    _write_items(run_paths, {"test": range(4), "dev": range(4, 7)})
    ev.run_evaluate(_with_methods(tiny_cfg, ["full_context", "cad", "lfd"], cad_alpha=0.0), run_paths)
    preds = read_table(run_paths.table("predictions"))
    by = {m: preds.filter(pl.col("method") == m) for m in ("full_context", "cad", "lfd")}
    assert by["cad"]["prompt"].to_list() == by["lfd"]["prompt"].to_list() == by["full_context"]["prompt"].to_list()
    assert by["cad"]["prediction"].to_list() == by["full_context"]["prediction"].to_list()  # alpha 0
    layers = read_table(run_paths.table("lfd_layers"))
    assert layers.columns == LFD_LAYERS.names and layers["layer"].to_list() == [0, 1, 2, 3]
    chosen, candidates = (layers.filter(pl.col(c))["layer"].to_list() for c in ("chosen", "candidate"))
    assert chosen == candidates == [LAYER]
    assert layers["n_items"].to_list() == [3] * 4
    checked = SUITES["lfd_layers"].frame(layers)
    assert checked["one_chosen"].all() and checked["chosen_is_lowest_candidate"].all()
    assert "fuses layer 2 with the final layer" in lfd_lines(layers)[0]
    for bad in (pl.col("layer") == 3, pl.col("layer") >= 2):  # a non-candidate chosen; two chosen
        wrong = SUITES["lfd_layers"].frame(layers.with_columns(chosen=bad))
        assert not (wrong["one_chosen"].all() and wrong["chosen_is_lowest_candidate"].all())

    ev.run_evaluate(_with_methods(tiny_cfg, ["full_context"]), run_paths)  # no LFD: the table empties
    assert read_table(run_paths.table("lfd_layers")).height == 0
    assert lfd_lines(read_table(run_paths.table("lfd_layers"))) == []


def test_lfd_answers_and_layer_table_come_back_from_the_answer_cache(tiny_cfg, run_paths, monkeypatch):
    """A sweep's seeds share LFD's answers: a second run with the same dev items and prompts decodes nothing and
    gets the same predictions and layer table; other dev items (which choose the layer) miss the cache."""
    import tasks.evaluate.decoding as decoding

    _write_items(run_paths, {"test": range(4), "dev": range(4, 7)})
    cfg = _with_methods(tiny_cfg, ["lfd"], answer_cache=run_paths.root.parent / "answers")
    ev.run_evaluate(cfg, run_paths)
    first = read_table(run_paths.table("predictions")).select("item_id", "prediction")
    layers = read_table(run_paths.table("lfd_layers"))
    run_paths.table("lfd_layers").unlink()

    def no_decoding(*args, **kwargs):
        raise AssertionError("LFD decoded again though its answers were kept")

    monkeypatch.setattr(decoding, "answer_lfd", no_decoding)
    ev.run_evaluate(cfg, run_paths)
    assert read_table(run_paths.table("predictions")).select("item_id", "prediction").equals(first)
    assert read_table(run_paths.table("lfd_layers")).equals(layers)
    _write_items(run_paths, {"test": range(4), "dev": range(4, 6)})  # one dev item fewer: another layer choice
    with pytest.raises(AssertionError, match="decoded again"):
        ev.run_evaluate(cfg, run_paths)
