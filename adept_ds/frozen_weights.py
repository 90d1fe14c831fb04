"""Where the frozen backbone lives under ZeRO-3, and how wide ZeRO-3's parameter window is: both from the memory plan.

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
from dataclasses import dataclass

import torch
from torch import nn

from adept_ds.config import RunConfig
from adept_ds.distributed import device_index, local_world_size


@dataclass(frozen=True)
class MemoryLayout:
    frozen_weights: str
    """"replicated" or "sharded" (what train.frozen_weights resolved to)."""
    wide_window: bool
    """ZeRO-3's "auto" window values are DeepSpeed's defaults (gathered weights stay live) rather than ~3 layers."""
    note: str
    """Why, for the run's log."""
    memory: int | None = None
    """The memory per rank it was planned for (None: unknown)."""


def device_bytes(config: RunConfig, gpu: bool) -> int | None:
    """The memory per rank the automatic choices plan against: train.memory_gb, else the device's (None: unknown)."""
    if config.train.memory_gb:
        return int(config.train.memory_gb * 2**30)
    if gpu:
        if not torch.cuda.is_available():  # e.g. `adept-ds check --device gpu` on a login node
            return None
        return torch.cuda.get_device_properties(device_index()).total_memory
    import psutil

    return psutil.virtual_memory().total // max(1, local_world_size())


def choose_layout(config: RunConfig, world_size: int, gpu: bool, memory: int | None, shape=None, auto_window: bool = True) -> MemoryLayout:
    """The first of (replicated, wide window), (replicated, layer window), (sharded, wide), (sharded, layers)
    whose training plan fits in `memory`, among those train.frozen_weights allows; when none fits, the smallest
    (the run may still fail: `adept-ds plan` says why); unknown memory takes sharded with the layer window.
    `shape`: the plan.ModelShape, when the caller has one; `auto_window`: the DeepSpeed config leaves ZeRO-3's
    window to adept_ds (else its values stand and only the frozen weights are chosen)."""
    from adept_ds.plan import GIB, model_shape, plan_run

    shape = shape or model_shape(config)
    allowed = ("replicated", "sharded") if config.train.frozen_weights == "auto" else (config.train.frozen_weights,)
    if shape.trains_everything:  # pt_full: nothing is frozen
        allowed = ("sharded",)
    candidates = [(frozen, wide) for frozen in allowed for wide in ((True, False) if auto_window else (False,))]
    if memory is None:
        frozen = allowed[-1]
        return MemoryLayout(
            frozen, False, f"frozen weights {frozen}, ZeRO-3 window of ~3 layers: device memory unknown (set train.memory_gb)"
        )
    needed, fits = {}, []
    for candidate in candidates:
        plan = plan_run(config, shape, world_size, gpu, memory, frozen_weights=candidate[0], wide_window=candidate[1])
        needed[candidate] = max(plan.needed(phase) for phase in ("train", "importance") if phase in plan.phases)
        fits.append(plan.fits_training())
    frozen, wide = next((c for c, ok in zip(candidates, fits) if ok), min(candidates, key=needed.get))
    window = "wide ZeRO-3 window (DeepSpeed's defaults)" if wide else "ZeRO-3 window of ~3 layers"
    window = window if auto_window else "ZeRO-3 window as the DeepSpeed config sets it"
    verdict = "fits" if any(fits) else "does not fit in any layout"
    tried = ", ".join(f"{f}{' wide' if w else ''} {n / GIB:.2f}" for (f, w), n in needed.items())
    return MemoryLayout(
        frozen,
        wide,
        f"frozen weights {frozen}{' (auto)' if config.train.frozen_weights == 'auto' else ''}, {window}: planned peak "
        f"per rank {needed[frozen, wide] / GIB:.2f} GiB of {memory / GIB:.2f} GiB {verdict} (GiB: {tried})",
        memory,
    )


def replicate_frozen(model: nn.Module) -> int:
    """Gather every frozen ZeRO-3 parameter of `model` once and keep it whole on this rank, as a non-persistent
    buffer under the same name (tied weights stay one tensor); returns the elements made whole.

    Call it after freezing and before `deepspeed.initialize`, which then manages only the trainable parameters.
    Collective: every rank calls it on the same model. One module's weights are gathered at a time.
    """
    import deepspeed

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
