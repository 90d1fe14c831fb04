"""Process-group setup and teardown: the only module besides the engine that touches torch.distributed."""

from __future__ import annotations

import gc
import math
import os

import torch
import torch.distributed as dist


def launched_distributed() -> bool:
    """True under a launcher (deepspeed, torchrun, mpirun with our env) that started several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def init_distributed() -> tuple[int, int]:
    """Start (or join) the process group DeepSpeed's launcher, torchrun or a single process set up.

    Returns (rank, world_size). gloo on CPU, nccl on GPU. On CPU the machine's cores are shared
    between the ranks of this node, so each rank takes its share of intra-op threads.
    """
    import deepspeed

    cpu = on_cpu()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python` run: be a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)
    if cpu:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Tear the process group down cleanly.

    Callers drop their engine/model/optimizer references first. Without collecting them before the
    barrier, a gloo worker thread can free a tensor during interpreter shutdown and abort the process.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_zero_first(build):
    """`build()` on rank 0 first (say, to fill an on-disk cache), then on the other ranks, which find it filled."""
    if not dist.is_initialized():
        return build()
    result = build() if dist.get_rank() == 0 else None
    dist.barrier()
    return result if dist.get_rank() == 0 else build()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned (gloo and nccl both reduce float64 on the tensor's own device)."""
    device = torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())
    reduced = tensor.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def local_share(param, stage: int, grad: bool = False) -> torch.Tensor | None:
    """This rank's share (fp32) of a parameter, or of its gradient when `grad`.

    ZeRO-3: the rank's own partition. ZeRO-1/2 keep whole parameters on every rank (only optimizer
    state and gradients are partitioned), and DeepSpeed hands them out whole; each rank then takes
    its 1/world slice so the all-reduced sums count every element once.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_local_fp32_param, safe_get_local_grad

    if stage == 3:
        return safe_get_local_grad(param) if grad else safe_get_local_fp32_param(param)
    whole = safe_get_full_grad(param) if grad else safe_get_full_fp32_param(param)
    if whole is None:
        return None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    chunk = math.ceil(whole.numel() / world_size)
    return whole.flatten()[rank * chunk : (rank + 1) * chunk]


def zero3_probe_runtime(model_dir, family, with_grad: bool, micro_batch: int, num_micro_batches: int):
    """A ProbeRuntime over a DeepSpeed ZeRO-3 engine: each rank holds only its partition of every weight.

    Gradient methods need ZeRO-3's gradient partitioning, which lives in its optimizer: we give it an
    SGD with lr=0 over the decoder-layer parameters and never call step(), so no weight changes.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from adept_ds.probe import ProbeRuntime

    world_size = dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": max(1, num_micro_batches),
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    hf_ds_config = HfDeepSpeedConfig(config)  # while alive, from_pretrained loads straight into partitions
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
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
        rank=dist.get_rank(),
        world_size=world_size,
        backward=backward,
        local_param_grad=lambda param: (local_share(param, 3), local_share(param, 3, grad=True)),
        all_reduce_sum=all_reduce_sum,
        forward=engine,
    )
