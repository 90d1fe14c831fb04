"""Several training runs one after another in one process group (a job's start-up, ~10 s here, paid once);
each is trained as launch/train.py trains it, then (rank 0) exported to its output_dir/final.
argv: runs.json, a list of run-config override lists."""

import json
import sys
from pathlib import Path

from adept_ds.run.config import load_run_config
from adept_ds.training.engine import Trainer
from adept_ds.training.export import export_checkpoint
from adept_ds.training.resolve import resolve_run

runs = json.loads(Path(sys.argv[1]).read_text())
for index, overrides in enumerate(runs):
    config = load_run_config(None, overrides)
    trainer = Trainer(resolve_run(config, show_progress=False), show_progress=False)
    trainer.train()
    rank, tag = trainer.rank, trainer.latest_tag()
    trainer.close(shutdown=index == len(runs) - 1)
    if rank == 0:
        export_checkpoint(config.output_dir + "/checkpoints", tag, config.model.path, config.output_dir + "/final", show_progress=False)
