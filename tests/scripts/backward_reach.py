"""Two training steps through the engine, recording which decoder layers backward reaches (and which it
runs forward again), what the optimizer holds state for, and how many ZeRO-3-gathered parameter elements
are live at once.
argv: out_dir overrides..."""

import json
import sys
from pathlib import Path

from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from adept_ds.model.families import decoder_layer_numel
from adept_ds.run.config import load_run_config
from adept_ds.training.engine import Trainer
from adept_ds.training.resolve import resolve_run

out_dir, *overrides = sys.argv[1:]
config = load_run_config(None, overrides)
trainer = Trainer(resolve_run(config, show_progress=False), show_progress=False)
reached = set()
model = trainer.engine.module
layers = trainer.family.decoder_layers(model)
gathered = [p for p in model.parameters() if not p.ds_persist]
live = [0]


def count_live(*_):
    """Gathered or being gathered (prefetched), at every module's forward and backward."""
    live[0] = max(live[0], sum(p.ds_numel for p in gathered if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))


for module in model.modules():
    module.register_forward_pre_hook(count_live)
    module.register_forward_hook(count_live)
    module.register_full_backward_pre_hook(count_live)
forward_calls = [0] * len(layers)  # a checkpointed layer's MLP starts again in backward (torch stops the rerun inside it)
for index, layer in enumerate(layers):
    layer.register_full_backward_hook(lambda module, grad_in, grad_out, index=index: reached.add(index))
    layer.mlp.register_forward_pre_hook(lambda *_, index=index: forward_calls.__setitem__(index, forward_calls[index] + 1))
losses = [trainer.train_step()]
losses.append(trainer.train_step())  # ZeRO-3 prefetches and keeps parameters by the trace it records in the first step
optimizer = trainer.engine.optimizer
state_elements = sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat)  # this rank's master weights
report = {
    "rank": trainer.rank,
    "backward_layers": sorted(reached),
    "forward_calls": forward_calls,
    "copied_layers": list(trainer.run.manifest["copied_layers"]),
    "num_layers": len(layers),
    "requires_grad": sorted(n for n, p in trainer.engine.module.named_parameters() if p.requires_grad),
    "optimizer_partition_elements": state_elements,
    "trainable_elements": sum(trainer.numels[n] for unit in trainer.units for n in unit.param_names),
    "world_size": trainer.world_size,
    "max_live_gathered_elements": live[0],
    "losses": losses,
    "layer_elements": decoder_layer_numel(model.config.to_dict()),
    "embedding_elements": model.get_input_embeddings().weight.ds_numel,
    "persistent_elements": sum(p.ds_numel for p in model.parameters() if p.ds_persist),
}
Path(out_dir, f"rank{trainer.rank}.json").write_text(json.dumps(report))
trainer.close()
