"""Activation checkpointing of the decoder layers that backward runs through.

Backward runs from the loss down to the lowest trainable layer and stops there: the layers below it and
the frozen embedding get no gradient and keep no activations for backward. So only the layers from the
lowest trainable one up are checkpointed (all of them for pt_full): each keeps just its input, and
backward runs its forward again. Under ZeRO-3 that second forward re-gathers the layer's parameters
through its submodules' hooks, as the first one did.

Non-reentrant (`torch.utils.checkpoint` with `use_reentrant=False`): the reentrant kind gives no gradient
to a segment whose inputs do not require grad, and the lowest trainable layer's input comes from frozen
layers. DeepSpeed 0.19 keeps a frozen parameter gathered through such a recompute (its PR 8148; before,
ZeRO-3 + non-reentrant checkpointing + frozen parameters failed torch's recompute check).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn
from torch.utils.checkpoint import checkpoint

from adept_ds.model.families import Family


def lowest_trainable_layer(family: Family, trainable: Iterable[str]) -> int | None:
    """The lowest decoder layer backward reaches: that of the lowest trainable tensor, 0 when a tensor outside
    the layers trains (pt_full's embedding needs backward through every layer), None when nothing trains."""
    layers = [family.split_layer_key(name) for name in trainable]
    if not layers:
        return None
    if any(found is None for found in layers):
        return 0
    return min(index for index, _ in layers)


def checkpoint_layers(model: nn.Module, family: Family, trainable: Iterable[str]) -> list[int]:
    """Checkpoint the decoder layers from the lowest trainable one up, in place; returns their indices.

    HF's own switch, set per layer: `gradient_checkpointing_enable` would checkpoint every layer and call
    `enable_input_require_grads`, which makes the embedding's output require grad, so backward would run
    through every frozen layer below the lowest copy.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = family.decoder_layers(model)
    lowest = lowest_trainable_layer(family, trainable)
    chosen = [] if lowest is None else list(range(lowest, len(layers)))
    recompute = functools.partial(checkpoint, use_reentrant=False)
    for index in chosen:
        layer = layers[index]
        if not isinstance(layer, GradientCheckpointingLayer):
            raise ValueError(
                f"{family.name}: decoder layer {type(layer).__name__} has no HF checkpointing switch; "
                "set train.activation_checkpointing: false"
            )
        # What HF's `_set_gradient_checkpointing` sets on each layer; a layer checkpoints only in train mode.
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = recompute
    return chosen
