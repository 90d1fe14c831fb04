"""The schedule vocabulary users bring (issue 28), read back from a real 2-rank ZeRO-3 run: train.epochs resolved
from the corpus, scheduler.warmup_ratio, and torchtitan's warmup_stable_decay composed with the unit-wise scales."""

from __future__ import annotations

import json
import math
import re

import pytest
from distributed import run_deepspeed
from train_setup import REPO, make_training_inputs, overrides
from transformers import AutoTokenizer

from adept_ds.cli import main as cli_main
from adept_ds.data.blocks import load_blocks
from adept_ds.runtime.run_log import read_records
from adept_ds.training.lr import schedule_factor

pytestmark = pytest.mark.dist


def test_epochs_warmup_ratio_and_wsd_on_two_real_ranks(tmp_path, capsys):
    inputs = make_training_inputs(tmp_path)
    run_dir = tmp_path / "run"
    schedule = {"scheduler.warmup_ratio": 0.25, "scheduler.decay_ratio": 0.5, "scheduler.min_lr_ratio": 0.0}
    values = {"train.epochs": 0.05, "train.save_interval": 0, "scheduler.type": "warmup_stable_decay", **schedule, "optimizer.lr": 0.01}
    result = run_deepspeed(REPO / "launch" / "train.py", *overrides(inputs, run_dir, **values), timeout=300)

    tokenizer = AutoTokenizer.from_pretrained(inputs["expanded"])
    blocks = len(load_blocks(inputs["domain"], tokenizer, 32, tmp_path / "blocks", show_progress=False))
    steps = math.ceil(0.05 * blocks / 4)  # a twentieth of an epoch at a global batch of micro 2 x 2 ranks
    assert f"train.epochs=0.05: train.max_steps = {steps} = ceil(0.05 x {blocks} domain blocks / global batch 4)" in result.stdout
    warmup = math.ceil(0.25 * steps)
    assert f"scheduler.warmup_ratio=0.25: scheduler.warmup_steps = {warmup} = ceil(ratio x {steps} steps)" in result.stdout

    records = read_records(run_dir, "train")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    expected = [0.01 * schedule_factor("warmup_stable_decay", r["step"], warmup, steps, 0.0, 0.5, "linear") for r in records]
    assert [r["lr_base"] for r in records] == pytest.approx(expected)
    assert records[-1]["lr_base"] == pytest.approx(0.0) and max(r["lr_base"] for r in records) == pytest.approx(0.01)
    # The unit scales ride on top of the schedule: the largest unit LR is lr_base x the largest scale in force.
    history = [json.loads(line) for line in (run_dir / "importance_history.jsonl").read_text().splitlines()]
    in_force = {1.0} | {max(record["scales"].values()) for record in history}
    ratios = [r["lr_max"] / r["lr_base"] for r in records if r["lr_base"] > 0]
    assert all(any(ratio == pytest.approx(scale) for scale in in_force) for ratio in ratios) and max(ratios) > 1.2
    assert re.search(r"deepspeed config: train_batch_size: auto = 4 ", result.stdout)

    # adept-ds check resolves the same length for a 2-rank job before it is submitted
    assert cli_main(["check", "--device", "cpu", "--num-gpus", "2", *overrides(inputs, tmp_path / "again", **values)]) == 0
    wanted = f"length: train.epochs=0.05: train.max_steps = {steps} = ceil(0.05 x {blocks} domain blocks / global batch 4)"
    assert wanted in capsys.readouterr().out
