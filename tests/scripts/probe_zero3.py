"""Probe with grad and fisher (fp32), mask (bf16, in chunks) and grad in bf16 on ZeRO-3 partitions; check no weight
changed; report scores and the dtype ZeRO-3 accumulates gradients in per rank."""

import gc
import json
import sys
from pathlib import Path

import deepspeed
import torch
from model_checks import load_state

from adept_ds.model.families import get_family
from adept_ds.probe.layers import probe_scores, shard_batches
from adept_ds.probe.runtime import zero3_probe_runtime
from adept_ds.runtime.distributed import init_distributed, shutdown_distributed

model_dir, blocks_file, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
rank, world_size = init_distributed()
blocks = torch.load(blocks_file)
family = get_family(json.loads((Path(model_dir) / "config.json").read_text())["model_type"])
on_disk = load_state(Path(model_dir))
report = {
    "rank": rank,
    "world_size": world_size,
    "scores": {},
    "base_loss": {},
    "dtype": {},
    "grad_accum_dtype": {},
    "partitioned": True,
    "weights_unchanged": True,
}
for method, dtype in (("grad", torch.float32), ("fisher", torch.float32), ("mask", torch.bfloat16), ("grad", torch.bfloat16)):
    key = method if dtype == torch.float32 or method == "mask" else f"{method}_bf16"
    batches = shard_batches(blocks, rank, world_size, batch_size=2)
    runtime = zero3_probe_runtime(model_dir, family, method != "mask", 2, len(batches), dtype)
    params = dict(runtime.model.named_parameters())
    report["partitioned"] &= all(p.numel() == 0 for p in params.values())
    report["dtype"][key] = sorted({str(p.ds_tensor.dtype) for p in params.values()})
    if method != "mask":  # the engine's ZeRO-3 optimizer holds the gradient partitions the scores are read from
        report["grad_accum_dtype"][key] = str(runtime.forward.optimizer.gradient_accumulation_dtype)
    scores, base, _ = probe_scores(family, runtime, batches, method, blocks[:, 1:].numel(), show_progress=False, mask_chunk_layers=3)
    report["scores"][key], report["base_loss"][key] = scores, base
    with deepspeed.zero.GatheredParameters(list(params.values())):
        report["weights_unchanged"] &= all(torch.equal(params[name].data, tensor.to(dtype)) for name, tensor in on_disk.items())
    del runtime, params
    gc.collect()
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
shutdown_distributed()
