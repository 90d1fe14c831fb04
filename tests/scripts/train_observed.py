"""launch/train.py's main, observed: which checkpoint each rank resumed from, and how many all-reduces of
the trainer's own each train_step made. With HIDE_ON_RANK1=tag,tag... rank 1 sees an older filesystem than
rank 0, as NFS or Lustre can show for a moment: those checkpoints' markers are not there yet.

argv: out_dir, then launch/train.py's argv. Writes out_dir/rank{R}.json:
{"rank", "exit_code", "resumed_from": [tag, ...], "reduces_per_step": [n, ...]}.
"""

import json
import os
import sys
from pathlib import Path

import adept_ds.training.checkpoints as train_checkpoints
import adept_ds.training.engine as engine
from adept_ds.train import main

out_dir, *argv = sys.argv[1:]
rank = int(os.environ["RANK"])
hidden = set(filter(None, os.environ.get("HIDE_ON_RANK1", "").split(","))) if rank == 1 else set()
if hidden:  # newest_complete and save_checkpoint both ask incomplete_reason
    seen_reason = train_checkpoints.incomplete_reason

    def incomplete_reason(path):
        return "its marker is not visible on this rank yet" if Path(path).name in hidden else seen_reason(path)

    train_checkpoints.incomplete_reason = engine.incomplete_reason = incomplete_reason

resumed_from, reduces_per_step = [], []
load_checkpoint, train_step, all_reduce_sum = engine.Trainer.load_checkpoint, engine.Trainer.train_step, engine.all_reduce_sum
in_step = False


def observed_load(self, tag):
    resumed_from.append(tag)
    return load_checkpoint(self, tag)


def observed_step(self):
    global in_step
    reduces_per_step.append(0)
    in_step = True
    try:
        return train_step(self)
    finally:
        in_step = False


def counted_all_reduce(tensor):
    if in_step:
        reduces_per_step[-1] += 1
    return all_reduce_sum(tensor)


engine.Trainer.load_checkpoint, engine.Trainer.train_step, engine.all_reduce_sum = observed_load, observed_step, counted_all_reduce
code = main(argv)
record = {"rank": rank, "exit_code": code, "resumed_from": resumed_from, "reduces_per_step": reduces_per_step}
(Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
sys.exit(code)
