"""Where the frozen backbone lives under ZeRO-3, and how wide ZeRO-3's parameter window is: both from the memory plan.

`choose_layout` takes the first layout whose training plan (plan.py) fits the memory per rank; the trainer carries it
out (training/frozen_weights.py keeps replicated frozen weights whole on every rank; ds_config.py sets the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adept_ds.run.config import RunConfig
from adept_ds.run.ds_config import window_is_auto
from adept_ds.run.plan import GIB, ModelShape, model_shape, plan_run
from adept_ds.runtime.distributed import device_index, local_world_size


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


def layout_and_plan(config: RunConfig, shape: ModelShape, world_size: int, gpu: bool, device_bytes: int | None):
    """(the MemoryLayout training would take, its Plan): frozen weights and window chosen as the engine does."""
    layout = choose_layout(config, world_size, gpu, device_bytes, shape, window_is_auto(config.deepspeed))
    plan = plan_run(config, shape, world_size, gpu, device_bytes, layout.frozen_weights, layout.wide_window)
    plan.notes.insert(0, layout.note)
    return layout, plan
