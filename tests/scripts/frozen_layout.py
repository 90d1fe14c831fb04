"""Training steps under one memory layout (train.frozen_weights), recording what ZeRO-3 partitions, the bytes
all-gathered per step once ZeRO-3 has recorded its trace (step 1) and how many of them within a ZeRO++ hpZ
group, hpZ's secondary shards, the losses, a unit-importance pass, a
checkpoint exported to an HF model (rank 0), and the step after it taken twice: on, and after loading it back. argv: out_dir overrides..."""

import json
import sys
from pathlib import Path

from adept_ds.run.config import load_run_config
from adept_ds.runtime.distributed import AllGatherCounter
from adept_ds.training.checkpoints import CHECKPOINT_DIR
from adept_ds.training.engine import Trainer
from adept_ds.training.export import export_checkpoint
from adept_ds.training.resolve import resolve_run

out_dir, *overrides = sys.argv[1:]
config = load_run_config(None, overrides)
trainer = Trainer(resolve_run(config, show_progress=False), show_progress=False)
model = trainer.engine.module
partitioned = {name: [p.ds_numel, p.ds_tensor.numel()] for name, p in model.named_parameters()}
hpz_ranks = trainer.ds_config["zero_optimization"].get("zero_hpz_partition_size", 1)
whole = {name: tensor.numel() for name, tensor in model.named_buffers() if name.endswith("weight")}
losses, gathered, in_subgroups = [trainer.train_step()], [], []
for _ in range(2):
    with AllGatherCounter() as counter:
        losses.append(trainer.train_step())
    gathered.append(counter.bytes)
    in_subgroups.append(counter.bytes_in_subgroups)
# hpZ's secondary shards once training has run: a frozen weight keeps its own, a trainable one gets a fresh one
secondary = {
    name: p.ds_secondary_tensor.numel() for name, p in model.named_parameters() if getattr(p, "ds_secondary_tensor", None) is not None
}
with AllGatherCounter() as counter:
    importance = trainer.recompute_importance()
checkpoint = trainer.save_checkpoint()
# Step 4 from the live state, then from the checkpoint loaded back into the same engine: a loaded state must not
# reuse anything gathered before (hpZ's secondary shards of the trainable weights).
step_after_save = trainer.train_step()
trainer.load_checkpoint(checkpoint.name)
step_after_load = trainer.train_step()
report = {
    "rank": trainer.rank,
    "world_size": trainer.world_size,
    "layout": trainer.layout.frozen_weights,
    "wide_window": trainer.layout.wide_window,
    "note": trainer.layout.note,
    "partitioned": partitioned,
    "hpz_ranks": hpz_ranks,
    "secondary": secondary,
    "whole": whole,
    "losses": losses,
    "gathered_bytes_per_step": gathered,
    "subgroup_bytes_per_step": in_subgroups,
    "importance": importance,
    "step_after_save": step_after_save,
    "step_after_load": step_after_load,
    "importance_gathered_bytes": counter.bytes,
    "checkpoint_files": sorted(path.name for path in checkpoint.iterdir()),
}
rank = trainer.rank
trainer.close()
if rank == 0:
    export_checkpoint(
        Path(config.output_dir) / CHECKPOINT_DIR, checkpoint.name, config.model.path, Path(out_dir) / "final", show_progress=False
    )
Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
