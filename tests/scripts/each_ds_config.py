"""One training step with each DeepSpeed config in turn, in one process group: shows every ZeRO stage
(and CPU offload) of the shipped configs really runs. argv: out_dir config.json,... key=value overrides..."""

import json
import sys
from pathlib import Path

from adept_ds.config import load_run_config
from adept_ds.distributed import shutdown_distributed
from adept_ds.engine import Trainer

out_dir, ds_configs, *overrides = sys.argv[1:]
first_loss, rank = {}, 0
for ds_config in ds_configs.split(","):
    name = Path(ds_config).stem
    config = load_run_config(None, [*overrides, f"deepspeed={ds_config}", f"output_dir={out_dir}/{name}"])
    trainer = Trainer(config, show_progress=False)
    first_loss[name] = {"loss": trainer.train()[0], "stage": trainer.stage}
    rank = trainer.rank
    trainer.close(shutdown=False)
    del trainer
shutdown_distributed()
(Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "first_loss": first_loss}))
