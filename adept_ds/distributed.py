"""Process-group setup and teardown: the only module besides the engine that touches torch.distributed."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


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
