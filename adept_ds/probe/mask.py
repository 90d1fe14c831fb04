"""The `mask` probe: how much the loss rises when one decoder layer is bypassed (its output := its input).

Bypassing layer l means layer l+1 receives layer l's input. A base pass records layer inputs; the pass
that bypasses l restarts from l's recorded input and runs only the layers above it, so the layers below
l are never recomputed.

Memory: one recorded input is B x T x H in the model's dtype; all L of them come to 43 GB per rank for
a 70B model (L=80, H=8192) at 4 blocks of 4,096 tokens in fp32. So the bypass candidates are taken in
chunks of C layers and only the current chunk's inputs are held: C/L of the whole. The first chunk's
inputs come from the base forward; each later chunk's are recomputed from the last input of the one
before, which costs L - C layer calls in all against the L(L-1)/2 of the bypass passes. `offload`
holds the recorded inputs in CPU memory and copies each back to the device when its pass starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from adept_ds.data.blocks import Batch
from adept_ds.model.families import Family
from adept_ds.probe.runtime import loss_sum, next_token_loss_sum

ACTIVATION_BUDGET_BYTES = 2 << 30
"""Recorded inputs per rank that the default chunk size keeps within (2 GiB): all layers of a 7B model at
4 blocks of 256 tokens; 8 of the 80 layers of a 70B model in bf16 at 4 blocks of 4,096 tokens."""


def default_chunk_layers(num_layers: int, layer_input_bytes: int, budget: int = ACTIVATION_BUDGET_BYTES) -> int:
    """The most layers whose recorded inputs fit in `budget` bytes: at least 1, at most all."""
    return max(1, min(num_layers, budget // layer_input_bytes))


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _offload(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu")


def record_layer_inputs(
    family: Family,
    model: nn.Module,
    input_ids: torch.Tensor,
    record: range | None = None,
    store: Callable = _keep,
    position_ids: torch.Tensor | None = None,
):
    """One base forward through the decoder, recording the inputs of the layers in `record` (default all),
    each passed through `store`, and every layer's call arguments.

    Returns ([input of each recorded layer], [kwargs per layer], last layer's output). Masks, rotary
    embeddings and per-layer attention types come from the model's own forward, so every family is
    handled alike; the kwargs are references to tensors the model builds once, not copies per layer. With
    `position_ids` (the document mask) they hold the block-diagonal mask, which the bypass passes reuse.
    """
    layers = family.decoder_layers(model)
    record = range(len(layers)) if record is None else record
    inputs, kwargs, last_output = [], [None] * len(layers), []

    def make_hook(index):
        def hook(module, args, call_kwargs):
            if index in record:
                inputs.append(store(args[0] if args else call_kwargs["hidden_states"]))
            kwargs[index] = {k: v for k, v in call_kwargs.items() if k != "hidden_states"}

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(lambda module, args, output: last_output.append(_hidden(output))))
    try:
        model.get_submodule(family.decoder_path)(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, kwargs, last_output[0]


def mask_loss_sums(
    family: Family, model: nn.Module, batch: Batch | torch.Tensor, chunk_layers: int | None = None, offload: bool = False
) -> tuple[torch.Tensor, int]:
    """[base loss sum, loss sum with layer 0 bypassed, ..., with layer L-1 bypassed] for one batch (a `Batch`, or
    a tensor of blocks), and the peak bytes of recorded layer inputs.

    The bypass candidates are taken `chunk_layers` at a time (default: all at once); `offload` holds the
    recorded inputs in CPU memory. Every rank must use the same chunk size: under ZeRO-3 each layer call
    gathers that layer's weights from all ranks, so all ranks call the layers in the same order.
    """
    batch = Batch.of(batch)
    layers = family.decoder_layers(model)
    num_layers = len(layers)
    chunk = min(chunk_layers or num_layers, num_layers)
    store = _offload if offload else _keep
    device = batch.input_ids.device
    with torch.no_grad():
        inputs, kwargs, final = record_layer_inputs(family, model, batch.input_ids, range(chunk), store, batch.position_ids)
        sums = [next_token_loss_sum(family, model, final, batch.labels)]
        del final
        peak = 0
        for start in range(0, num_layers, chunk):
            if start > 0:  # the base pass again from the previous chunk's last input, recording this chunk's
                hidden, inputs = inputs[-1].to(device), []
                for index in range(start - 1, min(start + chunk, num_layers) - 1):
                    hidden = _hidden(layers[index](hidden, **kwargs[index]))
                    inputs.append(store(hidden))
            peak = max(peak, sum(recorded.nbytes for recorded in inputs))
            for bypassed in range(start, start + len(inputs)):
                hidden = inputs[bypassed - start].to(device)
                for above in range(bypassed + 1, num_layers):
                    hidden = _hidden(layers[above](hidden, **kwargs[above]))
                sums.append(next_token_loss_sum(family, model, hidden, batch.labels))
    return torch.stack(sums), peak


@contextmanager
def bypass_layer(family: Family, model: nn.Module, index: int) -> Iterator[None]:
    """While active, decoder layer `index` returns its input unchanged (a hook: no weight is touched)."""

    def passthrough(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = family.decoder_layers(model)[index].register_forward_hook(passthrough, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def naive_mask_loss_sums(family: Family, model: nn.Module, batch: Batch | torch.Tensor) -> torch.Tensor:
    """The same numbers as `mask_loss_sums` the naive way: one full forward per bypassed layer."""
    batch = Batch.of(batch)

    def full_forward_loss():
        return loss_sum(model(**batch.model_inputs(labels=False), use_cache=False).logits[:, :-1], batch.targets)

    with torch.no_grad():
        sums = [full_forward_loss()]
        for index in range(len(family.decoder_layers(model))):
            with bypass_layer(family, model, index):
                sums.append(full_forward_loss())
    return torch.stack(sums)
