"""Every shipped run config and DeepSpeed config loads, resolves and points at real files."""

from pathlib import Path

import pytest

from adept_ds.config import load_run_config
from adept_ds.preflight import resolve_ds_config

REPO = Path(__file__).parent.parent
RUN_CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_configs_are_shipped():
    assert len(RUN_CONFIGS) >= 2 and {p.name for p in DS_CONFIGS} >= {"zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_loads_and_names_real_files(path):
    config = load_run_config(path)
    assert (REPO / config.deepspeed).is_file()
    for corpus in (config.data.domain, config.data.general):
        if corpus:
            assert (REPO / corpus).is_file(), corpus


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("world_size", [1, 2, 16])
@pytest.mark.parametrize("gpu", [False, True])
def test_ds_config_resolves_for_any_world_size(path, world_size, gpu):
    config = load_run_config(RUN_CONFIGS[0])
    resolved = resolve_ds_config(path, config, world_size, gpu)
    assert resolved["train_batch_size"] == config.train.micro_batch_size * config.train.gradient_accumulation_steps * world_size
    assert "auto" not in str(resolved)
    assert resolved["zero_optimization"]["stage"] in (1, 2, 3)
