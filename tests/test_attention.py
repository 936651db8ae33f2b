"""The conflict-attention loss, worked by hand, and the hook that feeds it the last layer's attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.finetune.attention import AttentionGrabber, attention_loss, last_attention_module


def _mask(n: int, *marked: int) -> torch.Tensor:
    return torch.tensor([i in marked for i in range(n)])


def test_attention_loss_hand_case():
    # 2 heads, 4 positions, key 2 is marked: queries 2 and 3 can see it, queries 0-1 cannot.
    p = torch.zeros(2, 4, 4)
    p[:, 0, 0] = 1.0
    p[:, 1, :2] = 0.5
    p[0, 2, :3] = torch.tensor([0.25, 0.25, 0.5])  # mass on marked 0.5
    p[1, 2, :3] = torch.tensor([0.0, 0.0, 1.0])  # 1.0
    p[0, 3] = torch.tensor([0.1, 0.1, 0.8, 0.0])  # 0.8
    p[1, 3] = torch.tensor([0.4, 0.3, 0.2, 0.1])  # 0.2
    expected = ((1 - 0.5) + (1 - 1.0) + (1 - 0.8) + (1 - 0.2)) / 4
    assert attention_loss(p, _mask(4, 2)).item() == pytest.approx(expected)
    full = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    assert attention_loss(full, _mask(2, 0, 1)).item() == pytest.approx(0.0)  # all mass on marked keys


def test_a_first_marked_key_counts_every_query():
    # Key 0 marked: queries 0, 1 and 2 all see it. Masses 1.0, 0.5 and 0.3 (key 2 also marked for query 2).
    p = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.7, 0.1]]])
    assert attention_loss(p, _mask(3, 0, 2)).item() == pytest.approx(((1 - 1.0) + (1 - 0.5) + (1 - 0.3)) / 3)


def test_queries_of_a_cached_forward_sit_at_the_last_key_positions():
    # 2 queries over 4 keys: query 0 is key position 2, query 1 is key position 3.
    p = torch.tensor([[[0.1, 0.6, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4]]])
    assert attention_loss(p, _mask(4, 1)).item() == pytest.approx(((1 - 0.6) + (1 - 0.2)) / 2)  # both see key 1
    assert attention_loss(p, _mask(4, 3)).item() == pytest.approx(1 - 0.4)  # only query 1 sees key 3
    assert attention_loss(p, _mask(4, 2)).item() == pytest.approx(((1 - 0.3) + (1 - 0.3)) / 2)


def test_no_marked_key_costs_nothing_and_keeps_the_graph():
    logits = torch.randn(2, 3, 3, requires_grad=True)
    probs = logits.softmax(-1)
    loss = attention_loss(probs, _mask(3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_one_query_of_a_decoding_step_sees_every_key():
    p = torch.tensor([[[0.2, 0.5, 0.3]], [[0.6, 0.1, 0.3]]])  # 2 heads, 1 query, 3 keys
    assert attention_loss(p, _mask(3, 1)).item() == pytest.approx(((1 - 0.5) + (1 - 0.1)) / 2)


def test_an_integer_mask_marks_its_nonzero_keys():
    p = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    assert attention_loss(p, torch.tensor([0, 2])).item() == pytest.approx(1 - 0.75)  # 2 marks once, not twice


def test_the_loss_is_float32_for_half_precision_attention():
    p = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]], dtype=torch.bfloat16)
    loss = attention_loss(p, _mask(2, 1))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.25)


def test_attention_loss_has_useful_gradient():
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    causal = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
    probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
    loss = attention_loss(probs, _mask(3, 1))
    loss.backward()
    # Gradient descent raises the logit of the marked key for every query that sees it.
    assert logits.grad[0, 1, 1] < 0 and logits.grad[0, 2, 1] < 0
    assert logits.grad[0, 0].abs().sum() == 0  # query 0 cannot see the marked key


@pytest.mark.parametrize(
    ("shape", "mask", "message"),
    [
        ((3, 3), _mask(3, 1), r"^attn_probs must be \[heads, q, k\], got \(3, 3\)$"),
        ((1, 3, 2), _mask(2, 1), r"^attn_probs needs 1 to k queries for its k keys, got 3 for 2$"),
        ((1, 0, 2), _mask(2, 1), r"^attn_probs needs 1 to k queries for its k keys, got 0 for 2$"),
        ((1, 3, 3), _mask(4, 1), r"^marked_mask must be \[3\], got \(4,\)$"),
    ],
)
def test_attention_loss_refuses_shapes_it_cannot_read(shape, mask, message):
    with pytest.raises(ValueError, match=message):
        attention_loss(torch.zeros(shape), mask)


def test_the_attention_loss_reads_the_last_decoder_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    assert last_attention_module(model) is model.model.layers[2].self_attn


class FakeAttention(nn.Module):
    """Named like an attention class, so the search by class name finds it."""


class Stack(nn.Module):
    def __init__(self, make_block):
        super().__init__()
        self.layers = nn.ModuleList([make_block() for _ in range(2)])


@pytest.mark.parametrize("attr", ["self_attn", "attn", "attention", "self_attention"])
def test_a_known_attribute_name_wins_over_a_class_name_match(attr):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoy = FakeAttention()
            setattr(self, attr, nn.Identity())

    model = Stack(Block)
    assert last_attention_module(model) is getattr(model.layers[1], attr)


def test_without_a_known_attribute_the_first_attention_class_is_taken():
    class BlockAttention(nn.Module):  # the layer's own class name ends in "Attention": never the layer itself
        def __init__(self):
            super().__init__()
            self.attn = "not a module"
            self.norm = nn.LayerNorm(4)
            self.mixer = FakeAttention()

    model = Stack(BlockAttention)
    assert last_attention_module(model) is model.layers[1].mixer


def test_a_layer_without_attention_is_refused_by_name():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"^no attention module found in Block$"):
        last_attention_module(Stack(Block))


class Eager(nn.Module):
    """An attention module's output shape: (output, weights) in eager mode, weights None otherwise."""

    def __init__(self, weights: torch.Tensor | None, returns: str = "pair"):
        super().__init__()
        self.weights, self.returns = weights, returns

    def forward(self, x):
        return {"pair": (x, self.weights), "single": (x,), "tensor": x}[self.returns]


def test_the_grabber_keeps_the_weights_once_and_lets_go():
    weights = torch.rand(1, 2, 2)
    module = Eager(weights)
    grabber = AttentionGrabber(module)
    with pytest.raises(RuntimeError, match=r"^no attention weights captured in this forward pass$"):
        grabber.pop()  # nothing before the first forward pass
    module(torch.zeros(1))
    assert grabber.pop() is weights
    with pytest.raises(RuntimeError, match=r"^no attention weights captured in this forward pass$"):
        grabber.pop()  # a stale tensor is never handed out twice
    grabber.remove()
    module(torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"^no attention weights captured"):
        grabber.pop()


@pytest.mark.parametrize("returns", ["pair", "single", "tensor"])
def test_the_grabber_refuses_a_module_that_returns_no_weights(returns):
    module = Eager(None, returns)  # weights None; a 1-tuple; a bare tensor (of 3 rows: never read as weights)
    AttentionGrabber(module)
    with pytest.raises(RuntimeError, match=r"^attention weights unavailable: load the model with "
                                           r"attn_implementation='eager'$"):
        module(torch.zeros(3))
