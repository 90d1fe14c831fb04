"""How long a step takes, before a run is queued: compute from the FLOP count (flops.py), communication from the
bytes ZeRO-3 moves, and from them time-to-train and GPU-hours (`adept-ds plan --tokens`).

Compute: a step's FLOPs (importance and validation amortised) at `mfu` of the device's dense peak.

Communication, per rank and step, d bytes per weight element (2 in bf16/fp16, 4 in fp32; 1 for a weight qwZ
gathers as int8). W is the world, and (W-1)/W is a ring's share:
- forward, each micro-batch: every weight ZeRO-3 partitions is all-gathered. That is every weight with
  `frozen_weights=sharded`, only the trainable ones when replicated;
- backward, each micro-batch: those of the layers backward runs through (from the lowest trainable one up), the
  final norm and the head are gathered again, unless the wide window kept them live since forward;
- the trainable gradients are reduce-scattered, each micro-batch;
- the importance pass makes its forwards and backwards too, amortised over `importance.interval`;
- with hpZ the frozen weights, and the backward's trainable ones, come from the node's secondary shards:
  node-local traffic.

Node-local traffic runs at NVLink's rate on GPUs (450 GB/s a direction per H100 SXM, its datasheet: 900 GB/s
total). Traffic between nodes runs at `network_gbps` per GPU. A one-node GPU job is all node-local. On CPU every
collective runs at `network_gbps` (gloo measured on loopback: benchmarks/plan_check.py).

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


def step_traffic(
    shape: ModelShape,
    world_size: int,
    micro_batches: int,
    dtype_bytes: int,
    frozen_weights: str = "sharded",
    wide_window: bool = False,
    hpz: bool = False,
    qwz: bool = False,
    importance_passes: float = 0.0,
) -> StepTraffic:
    """The bytes of one step's ZeRO-3 collectives per rank; `importance_passes`: probe batches (each a forward and
    a backward) per step, amortised. A wide window keeps forward's gathered weights live for backward."""
    if world_size == 1:
        return StepTraffic(0, 0)
    ring = (world_size - 1) / world_size
    lowest = 0 if shape.trains_everything else min(shape.trainable_layers)
    trains = {tensor.name for tensor in shape.trainable()}
    tied = not any(tensor.name.startswith("lm_head") for tensor in shape.tensors)
    gathered = [t for t in shape.tensors if frozen_weights == "sharded" or t.name in trains]
    forward = {"network": 0, "node_local": 0}
    for tensor in gathered:
        frozen = tensor.name not in trains
        forward["node_local" if hpz and frozen else "network"] += tensor.numel * (1 if qwz else dtype_bytes)
    backward = {"network": 0, "node_local": 0}
    for tensor in [] if wide_window else gathered:
        if tensor.layer is not None and tensor.layer < lowest:
            continue  # backward stops at the lowest trainable layer
        if tensor.layer is None and "embed" in tensor.name and not tied and tensor.name not in trains:
            continue  # an untied embedding gets no gradient and is not gathered again
        backward["node_local" if hpz else "network"] += tensor.numel * dtype_bytes
    gradients = sum(tensor.numel for tensor in shape.trainable()) * dtype_bytes
    passes = micro_batches + importance_passes
    network = ring * passes * (forward["network"] + backward["network"] + gradients)
    node_local = ring * passes * (forward["node_local"] + backward["node_local"])
    return StepTraffic(math.ceil(network), math.ceil(node_local))


def step_time(
    flops: StepFlops, traffic: StepTraffic, world_size: int, peak_tflops: float, mfu: float, network_gbps: float, gpu: bool, nodes: int
) -> StepTime:
    """Seconds of one step at `mfu` of `peak_tflops` per device, with the traffic at `network_gbps` between nodes
    (NVLink within one, on GPUs)."""
    compute = flops.total / (world_size * peak_tflops * 1e12 * mfu)
    between = network_gbps if (not gpu or nodes > 1) else NVLINK_GBPS
    within = NVLINK_GBPS if gpu else network_gbps
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
) -> StepTime:
    """The step time of a resolved run (its DeepSpeed config, layout and FLOPs)."""
    zero = ds_config.get("zero_optimization", {})
    half = half_precision(ds_config)
    importance = config.importance
    traffic = step_traffic(
        shape,
        world_size,
        config.train.gradient_accumulation_steps,
        2 if half else 4,
        layout.frozen_weights,
        layout.wide_window,
        hpz=zero.get("zero_hpz_partition_size", 1) > 1,
        qwz=bool(zero.get("zero_quantized_weights")),
        importance_passes=importance.batches / importance.interval if config.adaptive_lr else 0.0,
    )
    return step_time(flops, traffic, world_size, peak_tflops, mfu, network_gbps, gpu, nodes)
