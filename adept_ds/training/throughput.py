"""What a step achieves: model TFLOP/s per device and MFU, by the exact count (run/flops.py) and at 6N.

MFU is measured against the device's dense peak in the run's precision: `train.peak_tflops` when set, else the
datasheet's for a known GPU (run/flops.py), else on CPU a matmul rate measured once at start-up on every rank at
once (so the ranks share the cores as they do in training). Each figure says which it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from adept_ds.run.flops import StepFlops, gpu_peak_tflops


@dataclass(frozen=True)
class Peak:
    tflops: float | None
    """Dense peak TFLOP/s of one device; None: unknown (no MFU is logged)."""
    source: str
    """Where it comes from, for the run's log."""


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """This process's rate of size x size matrix products, in TFLOP/s, over about `seconds` (after one warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or count < 3:
        torch.mm(a, b)
        count += 1
    return 2 * size**3 * count / elapsed / 1e12


def device_peak(configured: float, gpu: bool, half_precision: bool, measured_on_cpu) -> Peak:
    """The peak MFU is measured against: `configured` (train.peak_tflops) if > 0, the datasheet's for this GPU, or
    `measured_on_cpu()` (each rank's matmul rate, averaged over ranks measuring at once)."""
    precision = "bf16/fp16" if half_precision else "fp32"
    if configured:
        return Peak(configured, f"train.peak_tflops={configured:g}")
    if gpu:
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        peak = gpu_peak_tflops(name, half_precision)
        if peak is None:
            return Peak(None, f"{name} is not in adept_ds/run/flops.py's datasheet table: set train.peak_tflops for MFU")
        return Peak(peak, f"{name}, {precision} dense, from its datasheet")
    return Peak(measured_on_cpu(), "measured: a 1024^2 fp32 matmul on every rank at once, at start-up")


def step_figures(flops: StepFlops, seconds: float, world_size: int, peak: Peak) -> dict[str, float]:
    """Per device: TFLOP/s by the exact count and at 6N, and both as MFU when the peak is known."""
    achieved = flops.train / seconds / world_size / 1e12
    six_n = flops.six_n / seconds / world_size / 1e12
    figures = {"tflops_per_s": achieved, "tflops_per_s_6n": six_n}
    if peak.tflops:
        figures |= {"mfu": achieved / peak.tflops, "mfu_6n": six_n / peak.tflops}
    return figures


def describe_flops(flops: StepFlops, peak: Peak, world_size: int) -> str:
    """The run's `flops:` line: what a step counts, at 6N, and the peak MFU is measured against."""
    extra = flops.importance + flops.validation
    amortised = f" (+{extra / 1e12:.4g} for importance and validation, amortised)" if extra else ""
    against = f"MFU against {peak.tflops:.4g} TFLOP/s per device ({peak.source})" if peak.tflops else f"no MFU: {peak.source}"
    return f"flops: {flops.train / 1e12:.4g} TFLOP a step{amortised}, {flops.six_n / 1e12:.4g} at 6N over {world_size} device(s); {against}"
