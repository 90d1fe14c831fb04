"""One rank of benchmarks/zeropp_quantization.py: an ADEPT run, with or without train.zeropp=qwz.

argv: RESULT_DIR key=value overrides...

Records, per optimizer step, the share of exact zeros in the copies' zero-initialised o_proj / down_proj as their
forwards see them (training and importance), and the largest magnitude of this rank's fp32 partitions of them.
Also the bytes all-gathered and the seconds of the whole run. Exports the final checkpoint to RESULT_DIR/final.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    result_dir, *overrides = sys.argv[1:]
    from adept_ds.run.config import load_run_config
    from adept_ds.runtime.distributed import AllGatherCounter
    from adept_ds.training.checkpoints import CHECKPOINT_DIR
    from adept_ds.training.engine import Trainer
    from adept_ds.training.export import export_checkpoint
    from adept_ds.training.resolve import resolve_run

    config = load_run_config(None, overrides)
    trainer = Trainer(resolve_run(config, show_progress=False), show_progress=False)
    copies = tuple(f"model.layers.{layer}." for layer in trainer.run.manifest["copied_layers"])
    steps = [{"zeros": 0, "elements": 0, "master_absmax": 0.0} for _ in range(config.train.max_steps)]

    def count_zeros(module, _inputs):
        if torch.is_grad_enabled() and trainer.state.step < len(steps):  # training and importance forwards
            seen = steps[trainer.state.step]
            seen["zeros"] += int((module.weight == 0).sum())
            seen["elements"] += module.weight.numel()
            seen["master_absmax"] = max(seen["master_absmax"], float(module.weight.ds_tensor.abs().max()))

    for name, module in trainer.engine.module.named_modules():
        if name.startswith(copies) and name.endswith(("self_attn.o_proj", "mlp.down_proj")):  # zero-initialised
            module.register_forward_pre_hook(count_zeros)
    started = time.perf_counter()
    with AllGatherCounter() as gathered:
        losses = trainer.train()
    record = {
        "train_seconds": time.perf_counter() - started,
        "gathered_bytes": gathered.bytes,
        "rank": trainer.rank,
        "losses": losses,
        "zero_share_seen": [seen["zeros"] / max(1, seen["elements"]) for seen in steps],
        "master_absmax": [seen["master_absmax"] for seen in steps],
        "units": [unit.name for unit in trainer.units],
        "importance": trainer.state.importance,
    }
    tag, rank = trainer.latest_tag(), trainer.rank
    trainer.close()
    if rank == 0:
        export_checkpoint(Path(config.output_dir) / CHECKPOINT_DIR, tag, config.model.path, Path(result_dir) / "final", show_progress=False)
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
