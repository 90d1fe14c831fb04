"""One training step with each DeepSpeed config in turn, in one process group: shows every ZeRO stage
(and CPU offload) of the shipped configs really runs. argv: out_dir config.json,... key=value overrides...

A bf16 config is resolved as on a GPU (adept_ds refuses one on CPU, where it is slow): DeepSpeed's CPU
accelerator trains in bf16, so it shows DeepSpeed accepts the config as shipped (fp32 gradient accumulation)."""

import json
import sys
from pathlib import Path

from adept_ds.run.config import load_run_config
from adept_ds.runtime.distributed import shutdown_distributed
from adept_ds.training.engine import Trainer
from adept_ds.training.resolve import resolve_run

out_dir, ds_configs, *overrides = sys.argv[1:]
first_loss, rank = {}, 0
for ds_config in ds_configs.split(","):
    name = Path(ds_config).stem
    config = load_run_config(None, [*overrides, f"deepspeed={ds_config}", f"output_dir={out_dir}/{name}"])
    trainer = Trainer(resolve_run(config, gpu=True if name.endswith("_bf16") else None, show_progress=False), show_progress=False)
    model_dtype, grad_accum_dtype = trainer.engine.get_data_types()
    first_loss[name] = {"loss": trainer.train()[0], "stage": trainer.stage, "dtypes": [str(model_dtype), str(grad_accum_dtype)]}
    rank = trainer.rank
    trainer.close(shutdown=False)
    del trainer
shutdown_distributed()
(Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "first_loss": first_loss}))
