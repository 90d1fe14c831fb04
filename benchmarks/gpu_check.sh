#!/usr/bin/env bash
# The GPU check, as one prepared script for a lent GPU machine: probe (mask, grad), adept and pt_full
# training in bf16 under ZeRO-3 with step time, memory and MFU, the LM loss's GPU chunks against HF's loss,
# the planner's GPU allowance measured (CUDA context, NCCL buffers, fragmentation), export and eval; <= 8 minutes on one
# GPU, then the ZeRO++ quantizer stand-in against DeepSpeed's CUDA kernel (benchmarks/qwz_kernel_check.py).
# Writes benchmarks/results/gpu-<date>.{md,json} and qwz-kernel-check-<date>.json. CI never runs it. Extra arguments go to
# benchmarks/gpu_check.py (e.g. --peak-tflops 989; --smoke checks the script on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# The machine has no network: torch, deepspeed and transformers must already be installed.
"$PYTHON" -c "import torch, deepspeed, transformers" || { echo "gpu_check: install torch, deepspeed and transformers first" >&2; exit 2; }
"$PYTHON" -c "import adept_ds" 2>/dev/null || "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
# The CPU stand-in for DeepSpeed's ZeRO++ quantizer (adept_ds.run.zeropp.TorchQuantizer) against the kernel itself; skipped by --smoke.
case " $* " in *" --smoke "*) ;; *) timeout 150 "$PYTHON" benchmarks/qwz_kernel_check.py ;; esac
