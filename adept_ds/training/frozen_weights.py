"""Keeping the frozen backbone whole on every rank (train.frozen_weights=replicated; run/memory_layout.py decides).

In ADEPT 85-90 % of the weights never change. Sharded like the rest, they are all-gathered for every forward and,
from the lowest trainable layer up, again for backward: ~2x the model in bytes per step, most of a step's
traffic. `replicated` gathers them once, at the start, and keeps them whole on every rank as plain tensors
(non-persistent buffers of their modules, in the model's dtype): ZeRO-3 then partitions, gathers and reduces only
the trainable units, and checkpoints still never hold a frozen weight.

Why not DeepSpeed's own persistence (`ds_persist`, `stage3_param_persistence_threshold`): ZeRO-3 re-partitions
every persistent parameter at each optimizer step (`DeepSpeedZeroOptimizer_Stage3.step` ->
`_partition_all_parameters`) and all-gathers them again after it (`_post_step`), which is right for the small
trainable norms it was made for and still 1x the frozen model per step for a backbone (benchmarks/frozen_weights.py
measures it). Taking the frozen tensors out of ZeRO's hands is what makes the traffic the trainable units' alone.
"""

from __future__ import annotations

import gc

import torch
from torch import nn


def replicate_frozen(model: nn.Module) -> int:
    """Gather every frozen ZeRO-3 parameter of `model` once and keep it whole on this rank, as a non-persistent
    buffer under the same name (tied weights stay one tensor); returns the elements made whole.

    Call it after freezing and before `deepspeed.initialize`, which then manages only the trainable parameters.
    Collective: every rank calls it on the same model. One module's weights are gathered at a time.
    """
    from adept_ds.runtime.distributed import import_deepspeed

    deepspeed = import_deepspeed()

    whole: dict[int, torch.Tensor] = {}
    frozen = []
    for module in model.modules():
        params = [(name, p) for name, p in module._parameters.items() if p is not None and not p.requires_grad]
        new = [p for _, p in params if id(p) not in whole]
        if new:
            with deepspeed.zero.GatheredParameters(new):
                for param in new:
                    whole[id(param)] = param.data.clone()
        frozen += [(module, name, param) for name, param in params]
    for module, name, param in frozen:
        del module._parameters[name]
        module.register_buffer(name, whole[id(param)], persistent=False)  # not in state_dict: never checkpointed
    del frozen
    gc.collect()  # the ZeRO parameters' partitions go with them
    return sum(tensor.numel() for tensor in whole.values())
