import json

import pytest

from adept_ds.config import load_run_config
from adept_ds.preflight import resolve_ds_config

MODEL_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128}


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain:\n  max_steps: 10\noptimizer:\n  lr: 1e-4\n")
    config = load_run_config(path, ["train.max_steps=3", "importance.mapping=power", "optimizer.betas=[0.9, 0.99]"])
    assert config.train.max_steps == 3
    assert config.optimizer.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string: coerced
    assert config.importance.mapping == "power"
    assert config.optimizer.betas == (0.9, 0.99)
    assert config.model == "m"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.max_step=3"], r"unknown config key 'train.max_step'; did you mean 'train.max_steps'\?"),
        (["imporance.interval=3"], r"unknown config key 'imporance'; did you mean 'importance'\?"),
        (["train.max_steps=ten"], r"config key 'train.max_steps' = 'ten': expected int"),
        (["train.max_steps=0"], r"train.max_steps=0: need an int >= 1"),
        (["scheduler.type=OneCycle"], r"scheduler.type='OneCycle': choose one of WarmupCosineLR, WarmupLR, WarmupDecayLR, constant"),
        (["importance.mapping=cubic"], r"importance.mapping='cubic': choose one of linear, power, uniform"),
        (["method=lora"], r"method='lora': choose one of adept, pt_full"),
        (["optimizer.lr=-1"], r"optimizer.lr=-1: need a positive number"),
        (["train"], r"override 'train' is not key=value"),
        (["train=3"], r"train must be a mapping"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, overrides)


def test_missing_paths_are_reported_before_any_process_starts(tmp_path):
    config = load_run_config(None, [f"model={tmp_path}", "data.domain=/nope.jsonl"])
    with pytest.raises(ValueError, match="data.domain='/nope.jsonl' does not exist"):
        config.validate_paths()
    with pytest.raises(ValueError, match="model='/absent' does not exist"):
        load_run_config(None, ["model=/absent"]).validate_paths()


def write(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


def test_auto_values_are_filled_from_the_run_config(tmp_path):
    config = load_run_config(None, ["train.micro_batch_size=3", "train.gradient_accumulation_steps=2", "train.gradient_clipping=0.5"])
    auto = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "stage3_prefetch_bucket_size": "auto",
            "stage3_max_live_parameters": "auto",
            "stage3_max_reuse_distance": "auto",
        },
    }
    resolved = resolve_ds_config(write(tmp_path, auto), config, world_size=4, gpu=False, model_config=MODEL_CONFIG)
    assert resolved["train_batch_size"] == 24 and resolved["train_micro_batch_size_per_gpu"] == 3
    assert resolved["gradient_accumulation_steps"] == 2 and resolved["gradient_clipping"] == 0.5
    assert resolved["bf16"]["enabled"] is False
    assert resolve_ds_config(write(tmp_path, auto), config, world_size=4, gpu=True, model_config=MODEL_CONFIG)["bf16"]["enabled"] is True
    # ZeRO-3's window in decoder layers: q, o 64x(4x16); k, v 64x(2x16); MLP 3x64x128; two norms: 36,992.
    zero = resolved["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == zero["stage3_max_reuse_distance"] == 36_992
    assert zero["stage3_max_live_parameters"] == 3 * 36_992
    # Never above DeepSpeed's defaults: Llama-70B (855,654,400 parameters per layer) gets 5e7 and 1e9, and a one-layer reuse distance.
    llama_70b = {"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672}
    zero = resolve_ds_config(write(tmp_path, auto), config, world_size=4, gpu=True, model_config=llama_70b)["zero_optimization"]
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"]) == (
        5e7,
        1e9,
        855_654_400,
    )


def test_bf16_under_zero_2_or_3_accumulates_gradients_in_fp32_unless_the_config_says_otherwise(tmp_path, capsys, monkeypatch):
    config = load_run_config(None, [])

    def resolved(stage: int, **extra) -> dict:
        data = {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage}, **extra}
        return resolve_ds_config(write(tmp_path, data), config, world_size=2, gpu=True, model_config=MODEL_CONFIG)

    assert resolved(3)["data_types"] == {"grad_accum_dtype": "fp32"} and resolved(2)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert capsys.readouterr().out.count("bf16 without data_types.grad_accum_dtype: accumulating gradients in fp32") == 2
    assert resolved(3, data_types={"grad_accum_dtype": "bf16"})["data_types"] == {"grad_accum_dtype": "bf16"}  # said otherwise
    assert "data_types" not in resolved(1)  # DeepSpeed would swap in its BF16_Optimizer
    monkeypatch.setenv("RANK", "1")
    assert resolved(3)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert capsys.readouterr().out == ""  # said once, by rank 0


def test_ds_config_errors(tmp_path):
    config = load_run_config(None, [])
    with pytest.raises(ValueError, match=r"train_batch_size=7 != micro batch 2 x accumulation 1 x world size 2"):
        resolve_ds_config(write(tmp_path, {"train_batch_size": 7}), config, world_size=2, gpu=False, model_config=MODEL_CONFIG)
    with pytest.raises(ValueError, match=r"remove the 'optimizer' section"):
        resolve_ds_config(write(tmp_path, {"optimizer": {"type": "Adam"}}), config, world_size=1, gpu=False, model_config=MODEL_CONFIG)
    with pytest.raises(ValueError, match=r"'zero_optimization.reduce_bucket_size' is \"auto\""):
        resolve_ds_config(
            write(tmp_path, {"zero_optimization": {"reduce_bucket_size": "auto"}}),
            config,
            world_size=1,
            gpu=False,
            model_config=MODEL_CONFIG,
        )
