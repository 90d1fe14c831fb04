"""On a GPU: does adept_ds.run.zeropp.TorchQuantizer (the CPU stand-in for train.zeropp=qwz)
compute what DeepSpeed's CUDA quantizer computes? Run by benchmarks/gpu_check.sh after the GPU check.

    python benchmarks/qwz_kernel_check.py [--output benchmarks/results]

Quantizes random fp16 tensors, in the group counts qwZ uses, with both. Half of each first group is made 1000x
smaller than the rest, like a zero-initialised copy beside a pretrained weight. Reports the int8 values that
differ, the largest relative difference of the scales and of the dequantized values, and how many of the small
values each maps to 0. Writes <output>/qwz-kernel-check-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("qwz_kernel_check: needs a CUDA device (DeepSpeed's quantizer is a CUDA kernel)")
    from deepspeed.ops.op_builder import QuantizerBuilder

    from adept_ds.run.zeropp import TorchQuantizer

    kernel, stand_in = QuantizerBuilder().load(), TorchQuantizer()
    generator = torch.Generator().manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(0), "cases": []}
    for groups, numel in ((1, 4096), (8, 65536), (64, 512_000)):
        values = torch.randn(numel, generator=generator) * 0.02
        small = slice(0, numel // groups // 2)
        values[small] *= 1e-3
        values = values.half()
        q_kernel, s_kernel = kernel.quantize(values.cuda(), groups, 8, kernel.Symmetric)
        q_stand_in, s_stand_in = stand_in.quantize(values, groups, 8, stand_in.Symmetric)
        d_kernel = kernel.dequantize(q_kernel, s_kernel, groups, 8, kernel.Symmetric).float().cpu()
        d_stand_in = stand_in.dequantize(q_stand_in, s_stand_in, groups, 8, stand_in.Symmetric).float()
        s_kernel = s_kernel.float().cpu().reshape(-1)
        report["cases"].append(
            {
                "groups": groups,
                "numel": numel,
                "int8_differing": int((q_kernel.cpu() != q_stand_in).sum()),
                "scale_max_rel_diff": float(((s_kernel - s_stand_in).abs() / s_kernel.abs()).max()),
                "dequantized_max_abs_diff": float((d_kernel - d_stand_in).abs().max()),
                "small_values_to_zero": {"kernel": int((d_kernel[small] == 0).sum()), "stand_in": int((d_stand_in[small] == 0).sum())},
                "small_values": small.stop,
            }
        )
    path = args.output / f"qwz-kernel-check-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
