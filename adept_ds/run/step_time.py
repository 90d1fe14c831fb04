"""How long a step takes, before a run is queued: compute from the FLOP count (flops.py), communication from the
bytes ZeRO-3 moves, and from them time-to-train and GPU-hours (`adept-ds plan --tokens`).

Compute: a step's FLOPs (importance and validation amortised) at `mfu` of the device's dense peak.

Communication, per rank and step, d bytes per weight element (2 in bf16/fp16, 4 in fp32; 1 for a weight qwZ
gathers as int8). W is the world, and (W-1)/W is a ring's share:
- forward, each micro-batch: every weight ZeRO-3 partitions is all-gathered. That is every weight with
  `frozen_weights=sharded`, only the trainable ones when replicated;
- backward, each micro-batch: those of the layers backward runs through (from the lowest trainable one up), the
  final norm and the head are gathered again, less what the window kept live since forward (the wide window:
  DeepSpeed's `stage3_max_live_parameters`, 1e9 elements; the ~3-layer window: none);
- the trainable gradients are reduce-scattered, each micro-batch;
- the importance pass makes its forwards and backwards too, amortised over `importance.interval`;
- validation makes forwards only (their gathers, no gradients), amortised over `eval.interval`;
- with hpZ the frozen weights, and the backward's trainable ones, come from the node's secondary shards:
  node-local traffic, in a ring of hpZ's group (`zero_hpz_partition_size`, g ranks: (g-1)/g);
- qwZ gathers every weight as int8, forward and backward.

Node-local traffic runs at NVLink's rate on GPUs (450 GB/s a direction per H100 SXM, its datasheet: 900 GB/s
total). Traffic between nodes runs at `network_gbps` per GPU. A one-node GPU job is all node-local. On CPU every
collective runs at `network_gbps` (gloo's all-gather rate: benchmarks/train_step.py measures it).

Overlap: none is assumed. Step time = compute + communication. DeepSpeed's prefetch hides part of the gathers
behind compute, so on GPUs the figure is an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adept_ds.run.config import RunConfig
from adept_ds.run.ds_config import half_precision
from adept_ds.run.flops import StepFlops
from adept_ds.run.memory_layout import MemoryLayout
from adept_ds.run.plan import ModelShape

NVLINK_GBPS = 3600.0
"""Node-local bandwidth per GPU and direction, Gb/s: H100 SXM's NVLink 4, 900 GB/s total (datasheet)."""
DEFAULT_NETWORK_GBPS = 400.0
"""Between nodes, per GPU: one 400 Gb/s NDR InfiniBand NIC per GPU, as DGX H100 nodes have."""
H100_MFU = 0.35
"""The default MFU: torchtitan's Llama-3.1-8B on 8 to 128 H100s in BF16 under FSDP, 33-39 % (its published
performance table), and llm-foundry's ~40 % at 7B and 70B."""


@dataclass(frozen=True)
class StepTraffic:
    """Bytes one rank receives in a step's collectives, by where they run."""

    network: int
    node_local: int


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    communication_s: float
    traffic: StepTraffic

    @property
    def seconds(self) -> float:
        return self.compute_s + self.communication_s  # no overlap assumed


@dataclass(frozen=True)
class Gathers:
    """Whole bytes ZeRO-3 all-gathers for one micro-batch's forward and backward (as `AllGatherCounter` counts them)."""

    network: int
    node_local: int


def micro_batch_gathers(
    shape: ModelShape,
    dtype_bytes: int,
    frozen_weights: str = "sharded",
    live: int = 0,
    hpz: bool = False,
    qwz: bool = False,
    backward: bool = True,
) -> Gathers:
    """What one micro-batch gathers. Forward: every weight ZeRO-3 partitions. Backward (unless `backward` is False:
    a validation forward): those of the layers it runs through, the final norm and the head, less the `live`
    elements still held from forward (ZeRO-3 releases the least recently used first, so the head and the top layers
    stay: backward needs them first)."""
    trains = {tensor.name for tensor in shape.trainable()}
    tied = not any(tensor.name.startswith("lm_head") for tensor in shape.tensors)
    weight_bytes = 1 if qwz else dtype_bytes  # qwZ quantizes every gather, forward and backward
    gathered = [t for t in shape.tensors if frozen_weights == "sharded" or t.name in trains]
    where = {"network": 0, "node_local": 0}
    for tensor in gathered:
        where["node_local" if hpz and tensor.name not in trains else "network"] += tensor.numel * weight_bytes
    lowest = shape.lowest_trainable_layer
    regathered = [
        tensor
        for tensor in gathered
        if backward
        and (
            (tensor.layer is None and (tied or "embed" not in tensor.name or tensor.name in trains))
            or (tensor.layer is not None and tensor.layer >= lowest)
        )
    ]
    # Backward's order: the head and final norm, then the layers from the top down.
    regathered.sort(key=lambda tensor: -1 if tensor.layer is None else shape.num_layers - tensor.layer)
    for tensor in regathered:
        kept = min(live, tensor.numel)
        live -= kept
        where["node_local" if hpz else "network"] += (tensor.numel - kept) * weight_bytes
    return Gathers(where["network"], where["node_local"])


def step_traffic(
    shape: ModelShape,
    world_size: int,
    micro_batches: int,
    dtype_bytes: int,
    frozen_weights: str = "sharded",
    live: int = 0,
    hpz: int = 1,
    qwz: bool = False,
    importance_passes: float = 0.0,
    validation_passes: float = 0.0,
) -> StepTraffic:
    """The bytes one rank receives in a step's ZeRO-3 collectives: each micro-batch's gathers (`live`: elements the
    window keeps from forward to backward) and its gradients' reduce-scatter; `importance_passes`: probe batches
    (a forward and a backward each) per step, amortised; `validation_passes`: validation forwards per step and
    rank, amortised (their gathers alone); `hpz`: hpZ's group size (1: off), whose node-local gathers run in a
    ring of that many ranks."""
    if world_size == 1:
        return StepTraffic(0, 0)
    ring, group_ring = (world_size - 1) / world_size, (hpz - 1) / hpz
    gathers = micro_batch_gathers(shape, dtype_bytes, frozen_weights, live, hpz > 1, qwz)
    forwards = micro_batch_gathers(shape, dtype_bytes, frozen_weights, hpz=hpz > 1, qwz=qwz, backward=False)
    gradients = sum(tensor.numel for tensor in shape.trainable()) * dtype_bytes
    passes = micro_batches + importance_passes
    network = passes * (gathers.network + gradients) + validation_passes * forwards.network
    node_local = passes * gathers.node_local + validation_passes * forwards.node_local
    return StepTraffic(math.ceil(ring * network), math.ceil(group_ring * node_local))


def link_rates(network_gbps: float, gpu: bool, nodes: int) -> tuple[float, float]:
    """(Gb/s of the collectives over the whole world, Gb/s of node-local ones): on GPUs NVLink within a node, so a
    one-node job's world collectives run on it too; on CPU everything at `network_gbps`."""
    within = NVLINK_GBPS if gpu else network_gbps
    return (within if gpu and nodes == 1 else network_gbps), within


def step_time(
    flops: StepFlops, traffic: StepTraffic, world_size: int, peak_tflops: float, mfu: float, network_gbps: float, gpu: bool, nodes: int
) -> StepTime:
    """Seconds of one step at `mfu` of `peak_tflops` per device, with the traffic at `link_rates`."""
    compute = flops.total / (world_size * peak_tflops * 1e12 * mfu)
    between, within = link_rates(network_gbps, gpu, nodes)
    communication = traffic.network * 8 / (between * 1e9) + traffic.node_local * 8 / (within * 1e9)
    return StepTime(compute, communication, traffic)


def run_step_time(
    config: RunConfig,
    shape: ModelShape,
    flops: StepFlops,
    ds_config: dict,
    layout: MemoryLayout,
    world_size: int,
    nodes: int,
    gpu: bool,
    peak_tflops: float,
    mfu: float,
    network_gbps: float,
    held_out: int = 0,
) -> StepTime:
    """The step time of a resolved run (its DeepSpeed config, layout and FLOPs; `held_out`: the blocks each
    validation scores, all ranks)."""
    zero = ds_config.get("zero_optimization", {})
    half = half_precision(ds_config)
    importance, micro = config.importance, config.train.micro_batch_size
    traffic = step_traffic(
        shape,
        world_size,
        config.train.gradient_accumulation_steps,
        2 if half else 4,
        layout.frozen_weights,
        # The wide window is DeepSpeed's defaults: up to stage3_max_live_parameters stay gathered into backward.
        live=int(zero.get("stage3_max_live_parameters", 10**9)) if layout.wide_window else 0,
        hpz=zero.get("zero_hpz_partition_size", 1),
        qwz=bool(zero.get("zero_quantized_weights")),
        importance_passes=importance.batches / importance.interval if config.adaptive_lr else 0.0,
        validation_passes=math.ceil(held_out / (world_size * micro)) / config.eval.interval if config.eval.interval else 0.0,
    )
    return step_time(flops, traffic, world_size, peak_tflops, mfu, network_gbps, gpu, nodes)
