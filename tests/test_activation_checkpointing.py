"""Activation checkpointing: for every method's trainable selection, the loss and gradients of running
without it (fp32), with only the layers from the lowest trainable one up recomputed, and less memory."""

from __future__ import annotations

import copy

import pytest
import torch
from tensor_memory import TensorMemory
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from adept_ds.model.families import get_family
from adept_ds.model.lm_loss import use_chunked_loss
from adept_ds.model.units import adept_units, full_model_units, set_trainable
from adept_ds.training.activation_checkpointing import checkpoint_layers, lowest_trainable_layer

LLAMA = get_family("llama")
NUM_LAYERS = 6
# The layers each method trains in a 6-layer model: ADEPT's (and its ablations') copies, LLaMA-Pro's
# uniform copies, ADEPT w/o stage 1's least important original layers, and every tensor for PT-Full.
TRAINED_LAYERS = {"adept": [2, 4], "adept_no_stage2": [2, 4], "llama_pro": [1, 3, 5], "adept_no_stage1": [3, 4], "pt_full": None}


def engine_like(method: str, checkpointed: bool) -> torch.nn.Module:
    """A tiny Llama set up as the engine sets it up: chunked loss, the method's units trainable, train mode."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=NUM_LAYERS, intermediate_size=128))
    model.config.use_cache = False
    use_chunked_loss(model, LLAMA)
    layers = TRAINED_LAYERS[method]
    units = full_model_units(model) if layers is None else adept_units(model, LLAMA, layers)
    set_trainable(model, units)
    if checkpointed:
        assert checkpoint_layers(model, LLAMA, [name for unit in units for name in unit.param_names]) == list(
            range(0 if layers is None else min(layers), NUM_LAYERS)
        )
    return model.train()


@pytest.mark.parametrize("method", TRAINED_LAYERS)
def test_checkpointing_keeps_loss_and_gradients_recomputes_only_from_the_lowest_trainable_layer_and_saves_memory(method):
    plain = engine_like(method, checkpointed=False)
    checkpointed = engine_like(method, checkpointed=True)
    checkpointed.load_state_dict(copy.deepcopy(plain.state_dict()))
    calls = [0] * NUM_LAYERS
    for index, layer in enumerate(LLAMA.decoder_layers(checkpointed)):
        layer.mlp.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    ids = torch.randint(0, 260, (4, 64), generator=torch.Generator().manual_seed(1))

    measured = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        with TensorMemory() as memory:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        measured[name] = loss, memory.peak
    torch.testing.assert_close(measured["checkpointed"][0], measured["plain"][0], rtol=1e-5, atol=0)
    grads = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
    assert set(grads) == {name for name, p in plain.named_parameters() if p.requires_grad}
    for name, param in checkpointed.named_parameters():
        assert (param.grad is None) == (name not in grads), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Backward reran each layer from the lowest trainable one up (into its MLP: torch stops a rerun once it has
    # what backward needs, so count with a pre-hook); the layers below, never.
    lowest = 0 if TRAINED_LAYERS[method] is None else min(TRAINED_LAYERS[method])
    assert calls == [1] * lowest + [2] * (NUM_LAYERS - lowest)
    assert measured["checkpointed"][1] < 0.7 * measured["plain"][1], measured


def test_lowest_trainable_layer():
    assert lowest_trainable_layer(LLAMA, ["model.layers.4.mlp.up_proj.weight", "model.layers.2.input_layernorm.weight"]) == 2
    assert lowest_trainable_layer(LLAMA, ["model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight"]) == 0
    assert lowest_trainable_layer(LLAMA, []) is None


def test_a_layer_checkpoints_only_in_train_mode():
    model = engine_like("adept", checkpointed=True).eval()
    ids = torch.randint(0, 260, (1, 16))
    calls = []
    LLAMA.decoder_layers(model)[5].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 1  # not recomputed: why the engine puts the model in train mode
