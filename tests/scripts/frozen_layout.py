"""Training steps under one memory layout (train.frozen_weights), recording what ZeRO-3 partitions, the bytes
all-gathered per step once ZeRO-3 has recorded its trace (step 1), the losses, a unit-importance pass, and a
checkpoint exported to an HF model (rank 0). argv: out_dir overrides..."""

import json
import sys
from pathlib import Path

from adept_ds.config import load_run_config
from adept_ds.distributed import AllGatherCounter
from adept_ds.engine import Trainer
from adept_ds.export import export_checkpoint
from adept_ds.train_checkpoints import CHECKPOINT_DIR

out_dir, *overrides = sys.argv[1:]
config = load_run_config(None, overrides)
trainer = Trainer(config, show_progress=False)
model = trainer.engine.module
partitioned = {name: [p.ds_numel, p.ds_tensor.numel()] for name, p in model.named_parameters()}
whole = {name: tensor.numel() for name, tensor in model.named_buffers() if name.endswith("weight")}
losses, gathered = [trainer.train_step()], []
for _ in range(2):
    with AllGatherCounter() as counter:
        losses.append(trainer.train_step())
    gathered.append(counter.bytes)
with AllGatherCounter() as counter:
    importance = trainer.recompute_importance()
checkpoint = trainer.save_checkpoint()
report = {
    "rank": trainer.rank,
    "world_size": trainer.world_size,
    "layout": trainer.layout.frozen_weights,
    "wide_window": trainer.layout.wide_window,
    "note": trainer.layout.note,
    "partitioned": partitioned,
    "whole": whole,
    "losses": losses,
    "gathered_bytes_per_step": gathered,
    "importance": importance,
    "importance_gathered_bytes": counter.bytes,
    "checkpoint_files": sorted(path.name for path in checkpoint.iterdir()),
}
rank = trainer.rank
trainer.close()
if rank == 0:
    export_checkpoint(Path(config.output_dir) / CHECKPOINT_DIR, checkpoint.name, config.model, Path(out_dir) / "final", show_progress=False)
Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
