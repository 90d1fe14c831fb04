"""How probing reaches the model: `ProbeRuntime`, over a plain module in one process or a DeepSpeed ZeRO-3 engine
(`zero3_probe_runtime`: the probe's edge with DeepSpeed), and the loss sums every probe method shares.

The probe code (layers.py, mask.py) only calls modules and these hooks, so it never needs to know whether the
weights are whole or ZeRO-3 partitions gathered on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adept_ds.model.families import Family
from adept_ds.runtime.distributed import all_reduce_sum, local_share


def _no_op(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class ProbeRuntime:
    """How probing reaches the model: a plain module in one process, or a DeepSpeed ZeRO-3 engine.

    The probe code (layers.py, mask.py) only calls modules and these hooks, so it never needs to know whether the
    weights are whole or ZeRO-3 partitions gathered on demand.
    """

    model: nn.Module
    device: torch.device = torch.device("cpu")
    """Where the model computes: batches are moved there."""
    rank: int = 0
    world_size: int = 1
    backward: Callable[[torch.Tensor], None] = field(default=lambda loss: loss.backward())
    local_param_grad: Callable[[nn.Parameter], tuple[torch.Tensor, torch.Tensor | None]] = field(
        default=lambda param: (param.detach(), param.grad)
    )
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = field(default=_no_op)
    forward: Callable[..., object] | None = None
    """What runs a forward pass with gradients (a DeepSpeed engine); default: the model itself."""

    def __call__(self, **inputs):
        return (self.forward or self.model)(**inputs)


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies of `logits` [B, T, V] against aligned `targets` [B, T] (-100: skipped), accumulated in
    float64 so that sums over batches and ranks do not depend on how the blocks were split."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return losses.double().sum()


def next_token_loss_sum(family: Family, model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss sum from the residual stream after the last layer against `labels` (the blocks' ids, -100 where a label
    is dropped); the head skips the last position, which predicts nothing inside the block."""
    return loss_sum(family.logits(model, hidden[:, :-1]), labels[:, 1:])


def plain_runtime(model: nn.Module, family: Family, with_grad: bool) -> ProbeRuntime:
    """One process, whole weights: only decoder-layer parameters get gradients (the embeddings and
    head never need them, and skipping them saves their weight-gradient matmuls)."""
    model.eval()
    layer_params = {id(p) for p in family.decoder_layers(model).parameters()}
    for param in model.parameters():
        param.requires_grad_(with_grad and id(param) in layer_params)
    return ProbeRuntime(model=model, device=next(model.parameters()).device)


def zero3_probe_runtime(model_dir, family, with_grad: bool, micro_batch: int, num_micro_batches: int, dtype=torch.float32):
    """A ProbeRuntime over a DeepSpeed ZeRO-3 engine: each rank holds only its partition of every weight,
    in `dtype` (float32 or bfloat16), on this rank's device.

    Gradient methods need ZeRO-3's gradient partitioning, which lives in its optimizer: we give it an
    SGD with lr=0 over the decoder-layer parameters and never call step(), so no weight changes.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from adept_ds.runtime.distributed import import_deepspeed

    deepspeed = import_deepspeed()

    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"ZeRO-3 probing runs in float32 or bfloat16, not {dtype}")
    world_size = dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": max(1, num_micro_batches),
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},  # ZeRO-3 partitions (and zero.Init loads) in this dtype
        # The grad/fisher scores sum gradients over micro-batches and ranks: in fp32, as training does (ds_config.py);
        # DeepSpeed would keep bf16 gradient partitions (8 bits of mantissa) for a bf16 model.
        "data_types": {"grad_accum_dtype": "fp32"},
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    hf_ds_config = HfDeepSpeedConfig(config)  # while alive, from_pretrained loads straight into partitions
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    layer_params = {id(p) for p in family.decoder_layers(model).parameters()}
    for param in model.parameters():
        param.requires_grad_(with_grad and id(param) in layer_params)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0) if with_grad else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.module.eval()
    del hf_ds_config

    def backward(loss: torch.Tensor) -> None:
        # ZeRO averages gradients over ranks; the caller's loss is this rank's share of a global sum.
        engine.backward(loss * world_size, scale_wrt_gas=False)

    return ProbeRuntime(
        model=engine.module,
        device=engine.device,
        rank=dist.get_rank(),
        world_size=world_size,
        backward=backward,
        local_param_grad=lambda param: (local_share(param, 3), local_share(param, 3, grad=True)),
        all_reduce_sum=all_reduce_sum,
        forward=engine,
    )
