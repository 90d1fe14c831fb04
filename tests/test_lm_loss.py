"""The chunked LM loss: HF's loss and gradients, without a vocab-wide tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from adept_ds.families import get_family
from adept_ds.lm_loss import chunk_options, use_chunked_loss
from tests.tiny_models import tiny_config

VOCAB = 4096
HIDDEN = 16  # the head weight (vocab x 16) is smaller than 32 tokens' logits


def tiny(family: str, tie: bool, trainable: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers=3, tie=tie, vocab_size=VOCAB, hidden_size=HIDDEN))
    for name, param in model.named_parameters():
        param.requires_grad_(trainable == "all" or name.startswith("model.layers.2."))
    return model


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("family,tie,trainable", [("llama", True, "all"), ("llama", True, "top"), ("qwen2", False, "all")])
def test_chunked_loss_equals_hf_loss_and_gradients(monkeypatch, family, tie, trainable):
    import adept_ds.lm_loss as lm_loss

    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 8 * VOCAB)  # 8 tokens per chunk: 8 chunks per batch
    reference = tiny(family, tie, trainable)
    chunked = copy.deepcopy(reference)
    use_chunked_loss(chunked, get_family(family))
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored positions count in neither loss

    with LargestTensor() as hf_largest:
        expected = reference(input_ids=ids, labels=labels).loss
        expected.backward()
    with LargestTensor() as largest:
        got = chunked(input_ids=ids, labels=labels).loss
        got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(reference.named_parameters(), chunked.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # HF makes (64 tokens x vocab) logits; the chunked loss never holds more than the vocab x 16 head
    # weight (or its gradient) or one 8-token chunk of logits.
    assert hf_largest.numel == ids.numel() * VOCAB
    assert largest.numel <= HIDDEN * VOCAB
    # Without labels the model is unchanged: logits as before.
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_chunks_hold_a_bounded_number_of_logits():
    for vocab in (260, 49152, 128256):
        rows = chunk_options(vocab).batch_chunk_size
        assert rows & (rows - 1) == 0 and rows * vocab <= 1 << 24 < 2 * rows * vocab


def test_loss_arguments_it_cannot_honour_are_refused():
    model = tiny("llama", tie=False, trainable="all")
    use_chunked_loss(model, get_family("llama"))
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match=r"does not take \['num_items_in_batch'\]"):
        model(input_ids=ids, labels=ids, num_items_in_batch=8)
    with pytest.raises(TypeError):
        model(ids, ids)  # HF's second positional argument is the attention mask, never the labels


def test_a_head_with_bias_is_refused():
    model = tiny("llama", tie=False, trainable="all")
    model.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        use_chunked_loss(model, get_family("llama"))
