"""A tiny expanded model plus domain and general corpora, and run configs over them."""

from __future__ import annotations

from pathlib import Path

from corpora import sentences, write_jsonl
from tiny_models import make_tiny_model

from adept_ds.model.expand import expand_checkpoint

REPO = Path(__file__).parent.parent


def make_training_inputs(root: Path, family: str = "llama") -> dict[str, Path]:
    original = make_tiny_model(root / "original", family, num_layers=4)
    expanded = root / "expanded"
    expand_checkpoint(original, expanded, [1, 2], show_progress=False)
    return {
        "original": original,
        "expanded": expanded,
        "domain": write_jsonl(root / "domain.jsonl", sentences(240, seed=1)),
        "general": write_jsonl(root / "general.jsonl", sentences(160, seed=2)),
    }


def overrides(inputs: dict[str, Path], output: Path, **extra) -> list[str]:
    values = {
        "model": inputs["expanded"],
        "deepspeed": REPO / "ds_configs" / "zero3.json",
        "output_dir": output,
        "data.domain": inputs["domain"],
        "data.general": inputs["general"],
        "data.block_size": 32,
        "data.cache_dir": output.parent / "blocks",
        "train.max_steps": 6,
        "train.save_interval": 2,
        "train.micro_batch_size": 2,
        "optimizer.lr": 0.01,
        "scheduler.warmup_steps": 2,
        "importance.interval": 2,
        "importance.batches": 2,
        # Validation changes which blocks train (it holds the corpora's tails out): tests of other features keep
        # the data they were written for; tests/test_validation.py turns it on.
        "eval.interval": 0,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]
