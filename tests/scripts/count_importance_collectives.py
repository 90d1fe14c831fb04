"""train_run.py in the real 2-rank run, with every collective counted (the wrappers only count, then call
through). Those issued while the trainer reads importance shares (`local_share`) or computes unit
importance (`unit_importance`) are listed per recompute; all others are only totalled.

argv: counts_dir, then train_run.py's argv. Writes counts_dir/rank{R}.json:
{"rank", "recomputes": [[[collective, numel], ...] per recompute], "elsewhere": {collective: count}}.
"""

import functools
import json
import os
import runpy
import sys
from pathlib import Path

import deepspeed.comm
import torch
import torch.distributed

import adept_ds.training.engine

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "inference_all_reduce",
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "_all_gather_base",
    "allgather_fn",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce_scatter_fn",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
)
state = {"reading": False, "depth": 0, "current": [], "recomputes": [], "elsewhere": {}}


def numel(values) -> int:
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            total += value.numel()
        elif isinstance(value, (list, tuple)):
            total += numel(value)
    return total


def counted(name, original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if state["depth"] == 0:  # deepspeed.comm calls torch.distributed: count the outer call only
            if state["reading"]:
                state["current"].append([name, numel([*args, *kwargs.values()])])
            else:
                state["elsewhere"][name] = state["elsewhere"].get(name, 0) + 1
        state["depth"] += 1
        try:
            return original(*args, **kwargs)
        finally:
            state["depth"] -= 1

    return wrapper


def reading(original, ends_recompute: bool):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        state["reading"] = True
        try:
            return original(*args, **kwargs)
        finally:
            state["reading"] = False
            if ends_recompute:
                state["recomputes"].append(state["current"])
                state["current"] = []

    return wrapper


for module in (torch.distributed, deepspeed.comm):
    for name in COLLECTIVES:
        if callable(getattr(module, name, None)):
            setattr(module, name, counted(name, getattr(module, name)))
adept_ds.training.engine.local_share = reading(adept_ds.training.engine.local_share, ends_recompute=False)
adept_ds.training.engine.unit_importance = reading(adept_ds.training.engine.unit_importance, ends_recompute=True)

counts_dir, *train_argv = sys.argv[1:]
train_run = Path(__file__).with_name("train_run.py")
sys.argv = [str(train_run), *train_argv]
runpy.run_path(str(train_run), run_name="__main__")
rank = int(os.environ["RANK"])
Path(counts_dir).mkdir(parents=True, exist_ok=True)
result = {"rank": rank, "recomputes": state["recomputes"], "elsewhere": state["elsewhere"]}
(Path(counts_dir) / f"rank{rank}.json").write_text(json.dumps(result))
