"""For each DeepSpeed scheduler: train a few steps with real importance and record, after every step,
each param group's lr, the unit importance in force, and the step count. argv: out_dir overrides...
$SCHEDULERS (comma-separated) limits the schedulers. $VARIANTS (JSON {name: [overrides]}) runs each scheduler
once per variant, in this one job, reported as "name/scheduler"."""

import json
import os
import sys
from pathlib import Path

from adept_ds.run.config import load_run_config
from adept_ds.training.engine import Trainer
from adept_ds.training.resolve import resolve_run

out_dir, *overrides = sys.argv[1:]
report = {}
kinds = os.environ.get("SCHEDULERS", "WarmupLR,WarmupCosineLR,WarmupDecayLR").split(",")
variants = json.loads(os.environ.get("VARIANTS", '{"": []}'))
runs = [(f"{name}/{kind}" if name else kind, extra, kind) for name, extra in variants.items() for kind in kinds]
for label, extra, kind in runs:
    config = load_run_config(None, [*overrides, *extra, f"scheduler.type={kind}", f"output_dir={out_dir}/{label}"])
    trainer = Trainer(resolve_run(config, show_progress=False), show_progress=False)
    records = []
    while trainer.state.step < config.train.max_steps:
        if trainer.state.step % config.importance.interval == 0:
            trainer.update_learning_rates()
        trainer.train_step()
        records.append(
            {
                "step": trainer.state.step,
                "group_lrs": [group["lr"] for group in trainer.optimizer.param_groups],
                "group_names": [group["name"] for group in trainer.optimizer.param_groups],
                "importance": trainer.state.importance,
            }
        )
    report[label] = records
    rank = trainer.rank
    trainer.close(shutdown=label == runs[-1][0])
Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "report": report}))
