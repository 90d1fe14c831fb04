"""One rank of a step-time / memory measurement (run by benchmarks/suite.py under the DeepSpeed launcher).

argv: RESULT_DIR WARMUP_STEPS TIMED_STEPS IMPORTANCE_REPEATS [--save-checkpoint] key=value overrides...
Writes RESULT_DIR/rank{R}.json: per-step seconds, the peak MFU is measured against and the all-gather bandwidth
(plan's step-time inputs), and bytes all-gathered (and of them, within ZeRO++ hpZ groups), unit-importance recompute seconds, peak memory (also per
phase: the peak RSS is reset after the engine is ready and again before the importance passes), and with
--save-checkpoint the checkpoint written after them.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

from adept_ds.run.config import load_run_config
from adept_ds.run.zeropp import describe as describe_zeropp
from adept_ds.runtime.distributed import AllGatherCounter
from adept_ds.training.engine import Trainer
from adept_ds.training.resolve import resolve_run


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> float:
    """Linux: make the process's peak RSS (VmHWM) its RSS now; returns that, in MB."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _rss_mb()


def _phase_peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    result_dir, warmup, timed, importance_repeats, *overrides = sys.argv[1:]
    save = "--save-checkpoint" in overrides
    overrides = [item for item in overrides if item != "--save-checkpoint"]
    config = load_run_config(None, overrides)
    rss_mb = {"imports": _rss_mb()}
    trainer = Trainer(resolve_run(config, show_progress=False), show_progress=False)
    rss_mb["engine_ready"], rss_mb["peak_to_engine_ready"] = _rss_mb(), _peak_rss_mb()
    rss_mb["steps_start"] = _reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_seconds, step_page_faults, gathered = [], [], AllGatherCounter()
    for index in range(int(warmup) + int(timed)):
        synchronize()
        started, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if index >= int(warmup):  # ZeRO-3 records its gather trace in the first step
            with gathered:
                trainer.train_step()
        else:
            trainer.train_step()
        synchronize()
        if index >= int(warmup):
            step_seconds.append(time.perf_counter() - started)
            step_page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        rss_mb.setdefault("after_first_step", _rss_mb())
    rss_mb["peak_to_steps_end"], rss_mb["steps_peak"] = _peak_rss_mb(), _phase_peak_rss_mb()
    rss_mb["importance_start"] = _reset_peak_rss()
    importance_seconds = []
    for _ in range(int(importance_repeats) if trainer.uses_importance else 0):
        synchronize()
        started = time.perf_counter()
        trainer.update_learning_rates()
        synchronize()
        importance_seconds.append(time.perf_counter() - started)
    rss_mb["peak_to_importance_end"], rss_mb["importance_peak"] = _peak_rss_mb(), _phase_peak_rss_mb()
    checkpoint = str(trainer.save_checkpoint()) if save else None
    gloo_gbps = all_gather_gbps() if trainer.world_size > 1 else None
    record = {
        "rank": trainer.rank,
        "world_size": trainer.world_size,
        "step_seconds": step_seconds,
        # pages the step touched for the first time (fresh allocations): on CPU each costs a page fault
        "step_page_faults": step_page_faults,
        "page_fault_gbps": page_fault_gbps(),
        "gathered_bytes_per_step": gathered.bytes / max(1, int(timed)),
        "subgroup_bytes_per_step": gathered.bytes_in_subgroups / max(1, int(timed)),
        "layout": trainer.layout.note,
        "zeropp": describe_zeropp(trainer.ds_config, config, trainer.world_size, trainer.layout.frozen_weights),
        "threads": torch.get_num_threads(),
        "importance_seconds": importance_seconds,
        "tokens_per_step_per_rank": config.train.micro_batch_size * config.train.gradient_accumulation_steps * config.data.block_size,
        "trainable_parameters": sum(trainer.numels[name] for unit in trainer.units for name in unit.param_names),
        "parameters": sum(trainer.numels.values()),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_mb": rss_mb,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        # reserved - allocated at the peaks: the caching allocator's fragmentation (plan.GpuAllowance)
        "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None,
        # what the device holds beyond torch's reserve: CUDA context and NCCL buffers
        "gpu_outside_torch_mb": outside_torch_mb(),
        "checkpoint": checkpoint,
        "step_flops": trainer.run.flops.train,  # a training step's exact FLOPs, all ranks (adept_ds/run/flops.py)
        "step_flops_6n": trainer.run.flops.six_n,
        "peak_tflops": trainer.peak.tflops,  # what MFU is measured against (on CPU: a matmul measured at start-up)
        "peak_source": trainer.peak.source,
        "all_gather_gbps": gloo_gbps,
    }
    Path(result_dir, f"rank{trainer.rank}.json").write_text(json.dumps(record))
    trainer.close()


def page_fault_gbps(numel: int = 64 * 2**20, repeats: int = 3) -> float:
    """Gb/s at which this rank faults in fresh pages: writing a freshly allocated buffer less writing a reused one
    (what a step's fresh allocations cost beyond their writes), every rank at once."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    reused = torch.empty(numel)
    reused.fill_(0.0)
    started = time.perf_counter()
    for _ in range(repeats):
        reused.fill_(1.0)
    written = time.perf_counter() - started
    del reused
    started = time.perf_counter()
    for _ in range(repeats):
        torch.empty(numel).fill_(1.0)
    faulted = time.perf_counter() - started - written
    return repeats * numel * 4 * 8 / faulted / 1e9


def all_gather_gbps(numel: int = 16 * 2**20, repeats: int = 5) -> float:
    """Gb/s this rank receives in an all-gather of `numel` fp32 elements per rank (its ring share, (W-1)/W of the
    gathered bytes, as plan's step time counts traffic), every rank at once, after one warm-up."""
    import torch.distributed as dist

    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mine, gathered = torch.ones(numel, device=device), torch.empty(numel * world, device=device)
    dist.all_gather_into_tensor(gathered, mine)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_gather_into_tensor(gathered, mine)
    synchronize()
    seconds = time.perf_counter() - started
    return repeats * (world - 1) * numel * 4 * 8 / seconds / 1e9


def outside_torch_mb() -> float | None:
    """Device memory in use that torch's caching allocator did not reserve (context, kernels, NCCL), this process
    alone on its GPU (nvidia-smi's view, from cudaMemGetInfo)."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**20


if __name__ == "__main__":
    main()
