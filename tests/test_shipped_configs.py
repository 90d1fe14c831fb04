"""Every shipped run config and DeepSpeed config loads, resolves and points at real files."""

import contextlib
import json
from pathlib import Path

import pytest
from distributed import read_rank_results, run_deepspeed
from train_setup import make_training_inputs, overrides

from adept_ds.run.config import load_run_config
from adept_ds.run.ds_config import resolve_ds_config

MODEL_CONFIG = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}  # SmolLM2-135M

REPO = Path(__file__).parent.parent
RUN_CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
# Configs that force bf16 or fp16 are for GPUs; every other one must also run on CPU (fp32).
CPU_DS_CONFIGS = [p for p in DS_CONFIGS if not any(json.loads(p.read_text()).get(k, {}).get("enabled") is True for k in ("bf16", "fp16"))]
BF16_DS_CONFIGS = [p for p in DS_CONFIGS if json.loads(p.read_text()).get("bf16", {}).get("enabled") is True]


def test_configs_are_shipped():
    assert len(RUN_CONFIGS) >= 2 and {p.name for p in DS_CONFIGS} >= {"zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_loads_and_names_real_files(path):
    config = load_run_config(path)
    assert (REPO / config.deepspeed).is_file()
    masked = load_run_config(path, ["data.document_mask=true", "data.loss_on_document_start=false", "model.attn_implementation=eager"])
    assert masked.data.document_mask and masked.model.path == config.model.path
    for corpus in [source.path for source in config.data.domain_sources()] + [config.data.general]:
        if corpus:
            assert (REPO / corpus).is_file(), corpus


# Every config on GPU; on CPU only those that do not force bf16/fp16 (those are refused there, tested below).
RESOLVE_CASES = [(path, gpu) for path in DS_CONFIGS for gpu in (False, True) if gpu or path in CPU_DS_CONFIGS]


@pytest.mark.parametrize("path,gpu", RESOLVE_CASES, ids=lambda v: v.name if isinstance(v, Path) else ("gpu" if v else "cpu"))
@pytest.mark.parametrize("world_size", [1, 2, 16])
def test_ds_config_resolves_for_any_world_size(path, world_size, gpu):
    config = load_run_config(RUN_CONFIGS[0])
    resolved = resolve_ds_config(path, config, world_size, gpu, MODEL_CONFIG)
    assert resolved["train_batch_size"] == config.train.micro_batch_size * config.train.gradient_accumulation_steps * world_size
    assert "auto" not in str(resolved)
    assert resolved["zero_optimization"]["stage"] in (1, 2, 3)


def test_gpu_precision_variants_are_shipped():
    gpu_only = {p.name: json.loads(p.read_text()) for p in DS_CONFIGS if p not in CPU_DS_CONFIGS}
    assert gpu_only["zero3_bf16.json"]["bf16"]["enabled"] is True and gpu_only["zero3_fp16.json"]["fp16"]["enabled"] is True
    assert {config["zero_optimization"]["stage"] for config in gpu_only.values()} == {2, 3}
    for path in DS_CONFIGS:
        refused = path.name.endswith(("_bf16.json", "_fp16.json"))
        with pytest.raises(ValueError, match="(bf16|fp16) is enabled but this run is on CPU") if refused else contextlib.nullcontext():
            resolve_ds_config(path, load_run_config(RUN_CONFIGS[0]), 2, False, MODEL_CONFIG)


def test_bf16_configs_accumulate_gradients_in_fp32():
    for path in BF16_DS_CONFIGS:
        assert json.loads(path.read_text())["data_types"] == {"grad_accum_dtype": "fp32"}, path.name
        assert resolve_ds_config(path, load_run_config(RUN_CONFIGS[0]), 2, True, MODEL_CONFIG)["data_types"]["grad_accum_dtype"] == "fp32"
    # The "auto" configs run bf16 on a GPU: their ZeRO-2/3 ones get fp32 accumulation there (ZeRO-1 keeps DeepSpeed's
    # default: fp32 accumulation would swap in DeepSpeed's BF16_Optimizer); fp32 on CPU needs nothing.
    for path in CPU_DS_CONFIGS:
        stage = json.loads(path.read_text())["zero_optimization"]["stage"]
        on_gpu = resolve_ds_config(path, load_run_config(RUN_CONFIGS[0]), 2, True, MODEL_CONFIG)
        assert on_gpu.get("data_types", {}).get("grad_accum_dtype") == ("fp32" if stage in (2, 3) else None), path.name
        assert "data_types" not in resolve_ds_config(path, load_run_config(RUN_CONFIGS[0]), 2, False, MODEL_CONFIG)


@pytest.mark.dist
def test_every_ds_config_trains_a_step(tmp_path):
    """Each ZeRO stage (1, 2, 3, 3 with CPU offload) takes a real step on 2 CPU ranks, from the same start
    to the same first loss; the bf16 configs too, on DeepSpeed's CPU accelerator, with fp32 gradient
    accumulation (over 2 micro-batches) and the chunked loss in bf16, to a first loss within bf16's rounding of it."""
    inputs = make_training_inputs(tmp_path)
    names = ",".join(str(p) for p in CPU_DS_CONFIGS + BF16_DS_CONFIGS)
    extra = {"train.max_steps": 1, "train.save_interval": 0, "train.gradient_accumulation_steps": 2}
    run_deepspeed("each_ds_config.py", tmp_path, names, *overrides(inputs, tmp_path / "unused", **extra))
    results = read_rank_results(tmp_path, world_size=2)
    first = results[0]["first_loss"]
    assert results[1]["first_loss"] == first
    fp32 = {name: v for name, v in first.items() if not name.endswith("_bf16")}
    assert {v["stage"] for v in fp32.values()} == {1, 2, 3} and "zero3_offload" in fp32
    assert all(v["dtypes"] == ["torch.float32", "torch.float32"] for v in fp32.values())
    losses = [v["loss"] for v in fp32.values()]
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-5)
    bf16 = {name: v for name, v in first.items() if name.endswith("_bf16")}
    assert {v["stage"] for v in bf16.values()} == {2, 3}
    assert all(v["dtypes"] == ["torch.bfloat16", "torch.float32"] for v in bf16.values())
    assert [v["loss"] for v in bf16.values()] == pytest.approx([losses[0]] * len(bf16), rel=1e-2)
