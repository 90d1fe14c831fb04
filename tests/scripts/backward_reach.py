"""One training step through the engine, recording which decoder layers backward reaches and what
the optimizer holds state for. argv: out_dir overrides..."""

import json
import sys
from pathlib import Path

from adept_ds.config import load_run_config
from adept_ds.engine import Trainer

out_dir, *overrides = sys.argv[1:]
config = load_run_config(None, overrides)
trainer = Trainer(config, show_progress=False)
reached = set()
layers = trainer.family.decoder_layers(trainer.engine.module)
for index, layer in enumerate(layers):
    layer.register_full_backward_hook(lambda module, grad_in, grad_out, index=index: reached.add(index))
trainer.train_step()
optimizer = trainer.engine.optimizer
state_elements = sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat)  # this rank's master weights
report = {
    "rank": trainer.rank,
    "backward_layers": sorted(reached),
    "copied_layers": trainer.manifest["copied_layers"],
    "num_layers": len(layers),
    "requires_grad": sorted(n for n, p in trainer.engine.module.named_parameters() if p.requires_grad),
    "optimizer_partition_elements": state_elements,
    "trainable_elements": sum(trainer.numels[n] for unit in trainer.units for n in unit.param_names),
    "world_size": trainer.world_size,
}
Path(out_dir, f"rank{trainer.rank}.json").write_text(json.dumps(report))
trainer.close()
