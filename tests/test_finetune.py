"""Conflict-aware fine-tuning: the example encoding, the attention hook on a model and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from schemas.tables import ITEMS, SENTENCE_SCORES, SENTENCES
from tasks.core import chat, prompts
from tasks.evaluate.methods import REGISTRY
from tasks.finetune.attention import AttentionGrabber, attention_loss, last_attention_module
from tasks.finetune.examples import IGNORE, build_example, marked_char_spans, select_train_items
from tasks.finetune.stage import load_finetuned, run_finetune
from tasks.core.models import load_model, load_tokenizer
from tasks.core.storage import read_table, text_key, write_parquet

FACTS = [
    ("Beats Music is owned by Apple.", "Who owns Beats Music?", "Apple"),
    ("Audible.com is owned by Amazon.", "Who owns Audible.com?", "Amazon"),
    ("Giuseppe Angeli is a citizen of Italy.", "Which country is Giuseppe Angeli a citizen of?", "Italy"),
    ("The Eiffel Tower is located in Rome.", "Where is the Eiffel Tower located?", "Rome"),
    ("Toyota was founded in Japan.", "Where was Toyota founded?", "Japan"),
    ("Danielle Darrieux speaks English.", "Which language does Danielle Darrieux speak?", "English"),
]
FILLER = ["Paris is the capital of France.", "Water boils at 100 degrees.", "The Nile flows north."]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from tasks.core.config import ModelConfig

    return load_tokenizer(ModelConfig(name=tiny_model))


def test_example_labels_and_marked_mask(tok):
    context = prompts.mark_context(["Paris is in France.", "The Eiffel Tower is in Rome.", "Cats purr."],
                                   [False, True, False])
    ex = build_example(tok, "Where is the Eiffel Tower?", context, ["Rome", "Roma"], max_length=512)
    prompt_text = chat.render(tok, REGISTRY["clear"].messages("Where is the Eiffel Tower?", context))
    enc = chat.encode(tok, prompt_text, return_offsets_mapping=True)
    n_prompt = len(enc["input_ids"])
    target = tok(prompts.target_text(["Rome"], tok), add_special_tokens=False)["input_ids"]

    assert ex.input_ids == list(enc["input_ids"]) + target and not ex.truncated
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt  # CE on answer tokens only
    assert ex.labels[n_prompt:] == target and target[-1] == tok.eos_token_id

    spans = marked_char_spans(prompt_text, context)
    assert len(spans) == 1
    s, e = spans[0]
    assert prompt_text[s:e] == "<conflict> The Eiffel Tower is in Rome. </conflict>"
    # Marked tokens are exactly those overlapping the span, and together they cover all of it.
    offsets = enc["offset_mapping"]
    covered = set()
    for (ts, te), m in zip(offsets, ex.marked[:n_prompt]):
        assert m == (ts < e and te > s)
        if m:
            covered.update(range(ts, te))
    assert set(range(s, e)) <= covered
    assert not any(ex.marked[n_prompt:])
    # The markers named in the system prompt are not marked.
    first_marked_char = min(ts for (ts, te), m in zip(offsets, ex.marked) if m)
    assert first_marked_char >= prompt_text.rfind(context)
    decoded = tok.decode([i for i, m in zip(ex.input_ids, ex.marked) if m])
    assert "<conflict>" in decoded and "</conflict>" in decoded and "Rome" in decoded and "Paris" not in decoded


def test_example_truncates_prompt_from_left(tok):
    context = prompts.mark_context(FILLER * 6 + ["The Eiffel Tower is in Rome."], [False] * 18 + [True])
    full = build_example(tok, "Where is the Eiffel Tower?", context, ["Rome"], max_length=4096)
    ex = build_example(tok, "Where is the Eiffel Tower?", context, ["Rome"], max_length=64)
    assert ex.truncated and len(ex.input_ids) == 64
    assert ex.input_ids == full.input_ids[-64:] and ex.labels == full.labels[-64:] and ex.marked == full.marked[-64:]
    assert any(ex.marked)  # the marked span sits near the end, so it survives


def test_select_train_items_seeded():
    import polars as pl

    items = pl.DataFrame({"item_id": [f"i{k:02d}" for k in range(30)], "split": ["train", "test"] * 15})
    a = select_train_items(items, 5, seed=1)
    assert a.height == 5 and set(a["split"]) == {"train"}
    assert a["item_id"].to_list() == select_train_items(items.reverse(), 5, seed=1)["item_id"].to_list()
    assert select_train_items(items, 100, seed=1).height == 15


def _write_run(paths, n_items: int = 6, flag_first: bool = True) -> None:
    """Synthetic items/sentences/sentence_scores: each item a 3-sentence context, the fact one flagged."""
    items, sents, scores = [], [], []
    for k in range(n_items):
        fact, question, answer = FACTS[k % len(FACTS)]
        texts = [FILLER[k % 3], fact, FILLER[(k + 1) % 3]]
        item_id = f"item{k}"
        items.append({
            "item_id": item_id, "dataset": "synthetic", "split": "train" if k < n_items - 1 else "test",
            "group": f"g{k}", "relation_id": "P0", "question": question, "context": " ".join(texts),
            "answers": [answer], "orig_answers": ["x"], "orig_context": None, "target_sentence": fact,
            "counterfactual": True,
        })
        pos = 0
        for j, t in enumerate(texts):
            sents.append({"item_id": item_id, "sent_idx": j, "key": text_key(t), "text": t, "char_start": pos,
                          "char_end": pos + len(t), "relevance": None, "label": None, "truthful": None})
            flagged = j == 1 and (flag_first or k > 0)
            scores.append({"item_id": item_id, "sent_idx": j, "key": text_key(t), "layer": 2, "probe": "logistic",
                           "p_conflict": 0.9 if flagged else 0.1, "flagged": flagged})
            pos += len(t) + 1
    write_parquet(items, paths.table("items"), ITEMS)
    write_parquet(sents, paths.table("sentences"), SENTENCES)
    write_parquet(scores, paths.table("sentence_scores"), SENTENCE_SCORES)


def test_run_finetune_end_to_end(tiny_cfg, run_paths):
    cfg = tiny_cfg.model_copy(update={"finetune": tiny_cfg.finetune.model_copy(update={"lr": 5e-3, "epochs": 2})})
    _write_run(run_paths)
    run_finetune(cfg, run_paths)
    adapter = run_paths.arm_adapter("clear")
    assert adapter == run_paths.root / "adapters" / "clear" and run_paths.train_log == adapter.parent / "train_log.json"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 1 and targets == sorted(targets)  # peft's set, saved in one order: identical runs, same bytes
    log = json.loads((adapter / "train_log.json").read_text())
    assert json.loads(run_paths.train_log.read_text()) == {"clear": log}  # every arm's log, here one
    assert log["n_items"] == 4 and log["steps"] == 8 and log["n_truncated"] == 0 and log["n_marked"] == 4
    for key in ("ce_first", "ce_last", "attn_first", "attn_last", "seconds"):
        assert math.isfinite(log[key]), key
    assert 0.0 < log["attn_first"] < 1.0
    assert log["lr"] == 5e-3 and log["config"]["attn_lambda"] == cfg.finetune.attn_lambda
    assert not list(adapter.parent.glob(".clear.*"))  # no temp dir left behind

    # The merged model differs from the base model.
    merged = load_finetuned(cfg, run_paths)
    base = load_model(cfg.model)
    ids = torch.tensor([[1, 50, 300, 700, 12]])
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)
    assert not merged.training


def test_unflagged_item_has_zero_attention_loss(tiny_cfg, tok):
    model = load_model(tiny_cfg.model, attn_implementation="eager")
    grabber = AttentionGrabber(last_attention_module(model))
    context = prompts.mark_context(["Paris is in France.", "Cats purr."], [False, False])
    ex = build_example(tok, "Where is Paris?", context, ["France"], max_length=256)
    assert not any(ex.marked)
    model(input_ids=torch.tensor([ex.input_ids]))
    weights = grabber.pop()[0]
    grabber.remove()
    n = len(ex.input_ids)
    assert weights.shape == (model.config.num_attention_heads, n, n)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-5)
    assert attention_loss(weights, torch.tensor(ex.marked)).item() == 0.0
    # With a marked span the same model gets a positive attention loss.
    marked_ctx = prompts.mark_context(["Paris is in France.", "Cats purr."], [True, False])
    ex2 = build_example(tok, "Where is Paris?", marked_ctx, ["France"], max_length=256)
    grabber = AttentionGrabber(last_attention_module(model))
    model(input_ids=torch.tensor([ex2.input_ids]))
    assert 0.0 < attention_loss(grabber.pop()[0], torch.tensor(ex2.marked)).item() < 1.0
    grabber.remove()


def test_items_without_flags_train_on_ce_only(tiny_cfg, run_paths):
    _write_run(run_paths, n_items=3, flag_first=False)  # item0 unflagged, item1 flagged, item2 test
    adapter = run_paths.arm_adapter("clear")
    adapter.mkdir(parents=True)
    (adapter / "stale.txt").write_text("from an earlier run")
    run_finetune(tiny_cfg, run_paths)
    # The earlier adapter directory is replaced whole, with no temp dir left behind.
    assert not (adapter / "stale.txt").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    assert not list(adapter.parent.glob(".clear.*"))
    log = json.loads((adapter / "train_log.json").read_text())
    assert log["n_items"] == 2 and log["n_marked"] == 1
    assert read_table(run_paths.table("items")).height == 3


def test_answer_ce_on_the_last_positions_equals_the_full_forward_loss(tiny_cfg, tok):
    """Logits at the answer's positions only give the loss (and LoRA gradients) of HF's own labelled forward."""
    from peft import LoraConfig, get_peft_model

    from tasks.finetune.training import answer_ce, keeps_logits

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_cfg.model, attn_implementation="eager"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for p in model.parameters():  # LoRA B starts at 0: perturb it so gradients reach every LoRA matrix
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    ex = build_example(tok, "Where is Paris?", "Paris is in Rome. Cats purr.", ["Rome and Lazio"], max_length=256)
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    assert keeps_logits(model)
    grads = []
    for last_only in (False, True):
        model.zero_grad()
        loss = answer_ce(model, ids, labels, last_only)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        if not last_only:
            full = loss.item()
    assert loss.item() == pytest.approx(full, rel=1e-6)
    logits = model(input_ids=ids).logits[0].float()  # the independent route: every position, then the shift
    n = sum(lab != IGNORE for lab in ex.labels)
    assert full == pytest.approx(torch.nn.functional.cross_entropy(logits[-n - 1:-1], ids[0, -n:]).item(), rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="non-empty suffix"):
        answer_ce(model, ids, torch.full_like(labels, IGNORE), True)


def _train_history(cfg, examples, compile_: bool, monkeypatch=None):
    from tasks.finetune.training import lora_model, train

    fcfg = cfg.finetune.model_copy(update={"compile": compile_, "lr": 5e-3})
    model, _ = lora_model(cfg.model, fcfg, seed=3)
    hist = train(model, examples, fcfg, lam=0.5, seed=3)
    return hist, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _examples(tok, n=4):
    out = []
    for i, (sentence, question, answer) in enumerate(FACTS[:n]):
        context = prompts.mark_context([FILLER[i % 3], sentence], [False, i % 2 == 0])
        out.append(build_example(tok, question, context, [answer], max_length=256))
    return out


def test_compiled_blocks_train_the_same_adapter_as_eager(tiny_cfg, tok):
    """torch.compile is a speed option: per-step CE and attention loss, and the trained LoRA weights, equal the
    eager run's within float tolerance; the last block (the hooked one) stays eager."""
    from tasks.core.models import decoder_layers
    from tasks.finetune.training import lora_model

    examples = _examples(tok)
    eager, eager_w = _train_history(tiny_cfg, examples, compile_=False)
    compiled, compiled_w = _train_history(tiny_cfg, examples, compile_=True)
    assert compiled.ce == pytest.approx(eager.ce, rel=1e-4, abs=1e-5)
    assert [a is None for a in compiled.attn] == [a is None for a in eager.attn]  # the unmarked steps (shuffled)
    assert sum(a is None for a in eager.attn) == 2
    assert [a for a in compiled.attn if a] == pytest.approx([a for a in eager.attn if a], rel=1e-4, abs=1e-5)
    assert any(bool(w.abs().max() > 1e-4) for k, w in eager_w.items() if "lora_B" in k)  # it did train
    assert eager_w.keys() == compiled_w.keys()
    # Adam turns rounding noise on near-zero gradients into updates of up to lr: 1e-4 is 2% of this lr (5e-3)
    assert max(float((eager_w[k] - compiled_w[k]).abs().max()) for k in eager_w) < 1e-4
    model, _ = lora_model(tiny_cfg.model, tiny_cfg.finetune.model_copy(update={"compile": True}), seed=3)
    blocks = list(decoder_layers(model))
    assert ["forward" in vars(b) for b in blocks] == [True] * (len(blocks) - 1) + [False]


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_cfg, tok, monkeypatch, caplog):
    """A compiler that fails at the first step (as without a C++ compiler) costs a warning, not the run: the
    history equals the eager run's exactly."""
    from tasks.finetune import training

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    def compile_with_failing_backend(model):
        blocks = list(training.decoder_layers(model))[:-1]
        for block in blocks:
            block.forward = torch.compile(block.forward, backend=failing_backend, dynamic=True)
        return blocks

    examples = _examples(tok)
    eager, eager_w = _train_history(tiny_cfg, examples, compile_=False)
    monkeypatch.setattr(training, "compile_blocks", compile_with_failing_backend)
    with caplog.at_level("WARNING", logger="tasks.finetune.training"):
        fallback, fallback_w = _train_history(tiny_cfg, examples, compile_=True)
    assert "torch.compile failed" in caplog.text and "no C++ compiler found" in caplog.text
    assert fallback.ce == eager.ce and fallback.attn == eager.attn
    assert all(torch.equal(eager_w[k], fallback_w[k]) for k in eager_w)
