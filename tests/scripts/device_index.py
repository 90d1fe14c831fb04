"""Which GPU each rank takes (adept_ds.runtime.distributed.device_index), from the environment its launcher gave it.

No GPU here: the visible count is simulated from CUDA_VISIBLE_DEVICES, as the CUDA runtime derives it."""

import json
import os
import sys
from pathlib import Path

import torch

from adept_ds.runtime.distributed import device_index, discover_ranks

discover_ranks()
torch.cuda.device_count = lambda: len(os.environ["CUDA_VISIBLE_DEVICES"].split(","))
seen = {"rank": int(os.environ["RANK"]), **{name: os.environ[name] for name in ("LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}}
seen["index"] = device_index()
os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"  # the node's every GPU visible to every rank (DeepSpeed's launcher, torchrun)
seen["index_all_visible"] = device_index()
(Path(sys.argv[1]) / f"rank{seen['rank']}.json").write_text(json.dumps(seen))
