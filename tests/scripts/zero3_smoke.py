"""ZeRO-3 on CPU: load a checkpoint partitioned from the start, train 3 steps on a fixed batch, report."""

import gc
import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from adept_ds.runtime.distributed import init_distributed, shutdown_distributed

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
rank, world_size = init_distributed()
ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "steps_per_print": 1000,
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
}
keep = HfDeepSpeedConfig(ds_config)  # must outlive from_pretrained: makes it load straight into partitions
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
partitioned = all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
batch = torch.arange(2 * 16).reshape(2, 16) % 250 + 3  # the same batch on every rank
losses = []
for _ in range(3):
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
(out_dir / f"rank{rank}.json").write_text(
    json.dumps({"rank": rank, "world_size": world_size, "partitioned": partitioned, "losses": losses})
)
del engine, model, optimizer, loss, keep
gc.collect()
shutdown_distributed()
