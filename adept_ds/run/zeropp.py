"""ZeRO++ for a frozen backbone: which of DeepSpeed's options apply to ADEPT, and how a run sets them.

`train.zeropp` turns them on by name and never by itself:
- hpz -> DeepSpeed's `zero_hpz_partition_size`. Every ZeRO-3 weight also keeps a secondary shard over the ranks
  of a node. DeepSpeed rebuilds a weight's secondary shard only when the optimizer updates it. A frozen weight's
  shard is built at its first release and then serves every later gather, forward and backward. So with
  sharded frozen weights the backbone crosses nodes in the first step only, and afterwards only the trainable
  units' gathers leave a node. It is lossless. It costs 1/hpz_ranks of the ZeRO-managed weights per rank (the
  planner counts it). Measured with 4 CPU ranks as 2 "nodes" of 2: tests/test_frozen_weights.py and
  benchmarks/frozen_weights.py.
- qwz -> `zero_quantized_weights`. Each gathered bucket travels as int8 with one absmax scale per group of up
  to ~8k elements: a quarter of fp32's bytes, half of bf16's. The forward and backward see the dequantized
  weights; the fp32 masters, the optimizer and the export stay exact. On the demo (ADEPT, 40 steps, sharded
  backbone) it cost at most 0.06 domain perplexity at lr 3e-4 and 3e-5 for 0.25x the bytes
  (benchmarks/zeropp_quantization.py). One hazard is seen only on toy models: a tensor smaller than a group
  shares its scale with its neighbours in the bucket, so a zero-initialised copy's o_proj among larger weights
  is gathered as exact zeros until it outgrows half an int8 step. Real models' gathered tensors span many
  groups each.

DeepSpeed's quantizer is a CUDA kernel. On CPU ranks `TorchQuantizer`, the kernel's arithmetic in torch, stands
in for it, so that CPU runs and CI exercise DeepSpeed's own qwZ path. benchmarks/qwz_kernel_check.py compares
the two on a GPU.

Refused, with the reason in the error:
- `zero_quantized_nontrainable_weights` (int8 storage of frozen weights). In DeepSpeed 0.19.8 it quantizes only
  weights frozen before partitioning (adept_ds freezes after loading), and `quantize_nontrainable_params()` takes
  fp16 partitions only. Worse, a coalesced gather of int8-stored weights dequantizes the bucket with one group
  size across tensors of different sizes, then casts the result to the int8 storage dtype
  (`AllGatherCoalescedHandle.wait`).
- `zero_quantized_gradients` (qgZ) on CPU: its swizzled quantize-and-reduce kernels have no stand-in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adept_ds.run.config import RunConfig
from adept_ds.runtime.distributed import local_world_size


class TorchQuantizer:
    """DeepSpeed's QuantizerBuilder module as ZeRO-3's qwZ calls it (quantize / dequantize, Symmetric, 8 bits), in
    torch for CPU ranks. It follows ops/csrc/includes/quantization_utils.h. The input goes through fp16. Each
    group gets scale = 2^8 / (2 * absmax) (1 for an all-zero group), q = clamp(round_half_even(x * scale), -128,
    127), with 1 / scale stored, and dequantize(q) = fp16(q * (1 / scale)). The scales come back flat: gloo
    checks the shapes of a gather where NCCL does not."""

    Symmetric, Asymmetric = 3, 4

    def quantize(self, tensor, groups, num_bits, quant_type):
        if num_bits != 8 or quant_type != self.Symmetric:
            raise ValueError(f"the CPU stand-in quantizes symmetric 8-bit only (asked: {num_bits} bits, type {quant_type})")
        values = tensor.to(torch.half).reshape(groups, -1).float()
        absmax = values.abs().amax(dim=1, keepdim=True)
        scale = torch.where(absmax == 0, torch.ones_like(absmax), 256.0 / (2 * absmax))
        quantized = torch.round(values * scale).clamp_(-128, 127).to(torch.int8).reshape(tensor.shape)
        return [quantized, (1 / scale).reshape(-1)]

    def dequantize(self, quantized, inverse_scales, groups, num_bits, quant_type):
        return (quantized.reshape(groups, -1).float() * inverse_scales.reshape(groups, 1)).to(torch.half).reshape(quantized.shape)


def use_cpu_quantizer() -> None:
    """Let DeepSpeed's qwZ run on CPU ranks: its quantizer module, normally the compiled CUDA kernel, becomes
    `TorchQuantizer`. Call before the model is built under ZeRO-3 (its Init loads the quantizer)."""
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

    CUDAQuantizer.quantizer_cuda_module = TorchQuantizer()


def check_quantized_options(zero: dict, gpu: bool, path: str | Path) -> None:
    """Refuse the quantized ZeRO++ options that cannot work here (this module's docstring says why)."""
    if zero.get("zero_quantized_nontrainable_weights"):
        raise ValueError(
            f"{path}: zero_optimization.zero_quantized_nontrainable_weights is broken in DeepSpeed 0.19.8 for weights frozen after "
            "loading. Coalesced gathers dequantize with one group size across tensors and cast the result to int8. "
            "Turn it off; train.zeropp=qwz quantizes the gathers instead, and train.frozen_weights=replicated or "
            "train.zeropp=hpz cut the frozen backbone's traffic losslessly"
        )
    if zero.get("zero_quantized_gradients") and not gpu:
        raise ValueError(
            f"{path}: zero_optimization.zero_quantized_gradients is on, but DeepSpeed's quantized reduction is CUDA-only; turn it off for CPU runs"
        )


def apply_zeropp(zero: dict, config: RunConfig, world_size: int, path: str | Path) -> None:
    """Set DeepSpeed's ZeRO++ keys in the resolved `zero_optimization` section for train.zeropp."""
    options = set(config.train.zeropp.split("+")) - {"off"}
    if options and zero.get("stage") != 3:
        raise ValueError(f"train.zeropp={config.train.zeropp}: ZeRO++ is a ZeRO-3 option, and {path} has ZeRO stage {zero.get('stage', 0)}")
    if "qwz" in options:
        zero["zero_quantized_weights"] = True
    if "hpz" not in options:
        return
    size = config.train.hpz_ranks or local_world_size(world_size)
    if size >= world_size:  # one node (or a requeue onto one): the secondary shard would be the primary again
        return
    if size < 2:
        raise ValueError(
            f"train.zeropp=hpz with train.hpz_ranks={size}: a secondary shard needs at least 2 ranks (0 = the ranks of a node)"
        )
    if world_size % size:
        raise ValueError(
            f"train.zeropp=hpz with secondary shards over {size} ranks: the world size {world_size} is not a multiple of it; "
            "set train.hpz_ranks to the ranks of a node, or 0 for the launcher's"
        )
    given = zero.get("zero_hpz_partition_size", 1)
    if given not in (1, size):
        raise ValueError(f"{path}: zero_hpz_partition_size={given} and train.zeropp=hpz over {size} ranks disagree; set one of them")
    zero["zero_hpz_partition_size"] = size


def describe(ds_config: dict, config: RunConfig, world_size: int, frozen_weights: str) -> str:
    """One line for the run's log and `adept-ds check`: what ZeRO++ does in this run (`frozen_weights`: the layout)."""
    zero = ds_config.get("zero_optimization", {})
    size, parts = zero.get("zero_hpz_partition_size", 1), []
    if size > 1:
        reach = (
            "the frozen weights are replicated, so it serves the trainable units only"
            if frozen_weights == "replicated"
            else "frozen weights stay node-local after step 1"
        )
        parts.append(f"hpZ: secondary shards over {size} ranks ({world_size // size} groups); {reach}")
    elif "hpz" in config.train.zeropp:
        size = config.train.hpz_ranks or local_world_size(world_size)
        parts.append(f"hpZ off: a secondary shard group of {size} ranks would span all {world_size} (one node)")
    if zero.get("zero_quantized_weights"):
        parts.append("qwZ: weights gathered as int8 (lossy; the fp32 masters stay exact)")
    return "ZeRO++ " + ("; ".join(parts) if parts else "off")
