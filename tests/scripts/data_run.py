"""Train (launch/train.py's code path) and record, per step and micro-batch, the (source, block) pairs this
rank trained on: what the engine really fed the model, read where it gathers a batch.

argv: out_dir key=value overrides... ; --resume anywhere resumes.
"""

import json
import sys
from pathlib import Path

import torch

import adept_ds.training.engine as engine
from adept_ds.run.config import load_run_config
from adept_ds.training.resolve import resolve_run

out_dir, *rest = sys.argv[1:]
resume = "--resume" in rest
config = load_run_config(None, [item for item in rest if item != "--resume"])
trained_on = []
gather = engine.gather_batch
engine.gather_batch = lambda stores, pairs, packing: trained_on.append([list(p) for p in pairs]) or gather(stores, pairs, packing)
trainer = engine.Trainer(resolve_run(config, resume=resume, show_progress=False), show_progress=False)
trainer.train()
world = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
record = {
    "trained_on": trained_on,
    "source_samples": trainer.state.source_samples,
    "sizes": [len(s) for s in trainer.domain],
    "timeout_s": world.options._timeout.total_seconds(),  # what train.timeout_minutes gave the process group
}
(Path(out_dir) / f"rank{trainer.rank}.json").write_text(json.dumps(record))
trainer.close()
