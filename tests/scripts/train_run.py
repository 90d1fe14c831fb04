"""Train with launch/train.py's code path, then (rank 0) record the engine's logits on a fixed batch.

argv: logits_file key=value overrides... ; pass --resume (or --auto-resume) as the first override to resume.
"""

import sys

import torch

from adept_ds.run.config import load_run_config
from adept_ds.training.engine import Trainer
from adept_ds.training.export import export_checkpoint
from adept_ds.training.resolve import resolve_run

logits_file, *rest = sys.argv[1:]
resume = "auto" if "--auto-resume" in rest else "--resume" in rest
config = load_run_config(None, [item for item in rest if item not in ("--resume", "--auto-resume")])
trainer = Trainer(resolve_run(config, resume=resume, show_progress=False), show_progress=False)
# What the optimizer holds right after a resume (or at the start): each group's LR, and AdamW's step counters.
inner = trainer.engine.optimizer.optimizer if hasattr(trainer.engine.optimizer, "optimizer") else trainer.engine.optimizer
started = {
    "lrs": [group["lr"] for group in trainer.engine.optimizer.param_groups],
    "weight_decays": [group["weight_decay"] for group in trainer.engine.optimizer.param_groups],
    "base_lr": trainer.scheduler.base_lr(),
    "importance": trainer.state.importance,
    "step": trainer.state.step,
    "adam_steps": sorted({float(s["step"]) for s in inner.state.values() if "step" in s}),
    "adam_step_objects": len({id(s["step"]) for s in inner.state.values() if "step" in s}),
}
trainer.train()
batch = torch.arange(3, 3 + 2 * 20).reshape(2, 20) % 250 + 3
trainer.engine.eval()
with torch.no_grad():
    logits = trainer.engine(input_ids=batch).logits  # every rank runs it: ZeRO-3 gathers collectively
if trainer.rank == 0:
    torch.save({"batch": batch, "logits": logits, "started": started}, logits_file)
rank, tag = trainer.rank, trainer.latest_tag()
trainer.close()
if rank == 0:
    export_checkpoint(config.output_dir + "/checkpoints", tag, config.model.path, config.output_dir + "/final")
