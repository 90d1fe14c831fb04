"""The chunked LM loss: HF's loss and gradients in fp32 and bf16, without a vocab-wide tensor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tensor_memory import TensorMemory
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

import adept_ds.model.lm_loss as lm_loss
from adept_ds.model.families import get_family
from adept_ds.model.lm_loss import chunk_rows, chunked_cross_entropy, use_chunked_loss

VOCAB = 4096
HIDDEN = 16  # the head weight (vocab x 16) is smaller than 32 tokens' logits


def tiny(family: str, tie: bool, trainable: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers=3, tie=tie, vocab_size=VOCAB, hidden_size=HIDDEN))
    for name, param in model.named_parameters():
        param.requires_grad_(trainable == "all" or name.startswith("model.layers.2."))
    return model.to(dtype)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


CASES = [("llama", True, "all"), ("llama", True, "top"), ("qwen2", False, "all")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,tie,trainable", CASES)
def test_chunked_loss_equals_hf_loss_and_gradients_and_never_makes_the_logits(monkeypatch, family, tie, trainable, dtype):

    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 8 * VOCAB)  # 8 tokens per chunk: 8 chunks per batch, the last one short
    reference = tiny(family, tie, trainable, dtype)
    chunked = copy.deepcopy(reference)
    use_chunked_loss(chunked, get_family(family))
    ids = torch.randint(0, VOCAB, (2, 31), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored positions count in neither loss

    with TensorMemory() as hf_memory:
        expected = reference(input_ids=ids, labels=labels).loss
        expected.backward()
    with TensorMemory() as memory:
        got = chunked(input_ids=ids, labels=labels).loss
        got.backward()

    # HF upcasts the logits and takes its loss in fp32; so does the chunked loss, chunk by chunk.
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(reference.named_parameters(), chunked.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is None:
            continue
        assert b.grad.dtype == a.grad.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
        else:  # bf16 rounds each gradient to 3 significant digits, in a different order of operations
            assert relative_error(b.grad, a.grad) < 2e-2, name
    # HF makes (62 tokens x vocab) logits; the chunked loss never holds more than the vocab x 16 head
    # weight (or its gradient) or one 8-token chunk of logits.
    assert hf_memory.largest == ids.numel() * VOCAB
    assert memory.largest <= HIDDEN * VOCAB < ids.numel() * VOCAB
    assert memory.peak < hf_memory.peak / 2
    # Without labels the model is unchanged: logits as before.
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_chunked_cross_entropy_scales_with_the_incoming_gradient_and_needs_no_grad(monkeypatch):

    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 4 * 100)  # 4 tokens per chunk
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    weight = torch.randn(100, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 100, (10,), generator=generator)
    targets[3] = -100
    (3 * chunked_cross_entropy(hidden, weight, targets)).backward()  # e.g. a loss scaled by accumulation
    got = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    (3 * F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)).backward()
    torch.testing.assert_close(got, (hidden.grad, weight.grad), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradient is precomputed, the loss is the same
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets), F.cross_entropy(hidden @ weight.T, targets))


def test_chunks_hold_a_bounded_number_of_logits():
    for vocab in (260, 49152, 128256):
        rows = chunk_rows(vocab)
        assert rows & (rows - 1) == 0 and rows * vocab <= 1 << 24 < 2 * rows * vocab
    # On a GPU: a byte budget for the fp32 logits, and never fewer than 1024 rows (the head GEMMs compute-bound).
    assert {vocab: chunk_rows(vocab, gpu=True) for vocab in (260, 49152, 128256, 262144, 1 << 20)} == {
        260: 1 << 18,
        49152: 2048,
        128256: 1024,
        262144: 1024,
        1 << 20: 1024,
    }
    for vocab in (260, 49152, 128256):
        rows = chunk_rows(vocab, gpu=True)
        assert rows * vocab * 4 <= lm_loss.GPU_CHUNK_BYTES < 2 * rows * vocab * 4


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
