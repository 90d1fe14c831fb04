import json

import pytest
import yaml

from adept_ds.model.families import decoder_layer_numel
from adept_ds.run.config import load_run_config
from adept_ds.run.ds_config import resolve_ds_config

MODEL_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128}


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain:\n  max_steps: 10\noptimizer:\n  lr: 1e-4\n")
    config = load_run_config(path, ["train.max_steps=3", "importance.mapping=power", "optimizer.betas=[0.9, 0.99]"])
    assert config.train.max_steps == 3
    assert config.optimizer.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string: coerced
    assert config.importance.mapping == "power"
    assert config.optimizer.betas == (0.9, 0.99)
    assert config.model.path == str(tmp_path / "m")  # relative to the run config's directory


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
        (["scheduler.warmup_steps=0"], r"scheduler.warmup_steps=0: DeepSpeed's WarmupCosineLR needs at least 1; for no warmup take"),
        (["scheduler.warmup_ratio=1.5"], r"scheduler.warmup_ratio=1.5: need a number in \[0, 1\)"),
        (["scheduler.decay_type=step"], r"scheduler.decay_type='step': choose one of linear, sqrt, cosine"),
        (["train.epochs=-1"], r"train.epochs=-1: need a number >= 0"),
        (["report.to=[tensorboard, comet]"], r"report.to=\['tensorboard', 'comet'\]: choose any of tensorboard, wandb, mlflow"),
        (["optimizer.betas=0.9"], r"optimizer.betas=0.9: need two numbers in \[0, 1\), e.g. \[0.9, 0.95\]"),
        (["optimizer.betas=[0.9]"], r"optimizer.betas=\[0.9\]: need two numbers in \[0, 1\)"),
        (["optimizer.betas=[0.9, 1.5]"], r"optimizer.betas=\[0.9, 1.5\]: need two numbers in \[0, 1\)"),
        (["train"], r"override 'train' is not key=value"),
        (["data.document_mask=maybe"], r"config key 'data.document_mask' = 'maybe': expected bool"),
        (["data.loss_on_document_start=2"], r"config key 'data.loss_on_document_start' = 2: expected bool"),
        (
            ["model.attn_implementation=flash"],
            r"model.attn_implementation='flash': choose one of auto, sdpa, eager, flash_attention_2, flex",
        ),
        (["model.attn_implementaton=sdpa"], r"unknown config key 'model.attn_implementaton'; did you mean 'model.attn_implementation'\?"),
        (["train=3"], r"train must be a mapping"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message) as refused:
        load_run_config(None, overrides)
    assert "\n" not in str(refused.value)


def test_the_model_is_a_path_or_a_section_with_its_attention_kernel(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("model: m\n")
    config = load_run_config(tmp_path / "a.yaml", ["model.attn_implementation=eager"])
    assert (config.model.path, config.model.attn_implementation) == (str(tmp_path / "m"), "eager")
    (tmp_path / "b.yaml").write_text("model:\n  path: m\n  attn_implementation: eager\n")
    config = load_run_config(tmp_path / "b.yaml", ["model=other"])  # model=DIR sets the path, and only the path
    assert (config.model.path, config.model.attn_implementation) == (str(tmp_path / "other"), "eager")
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict()))  # as a run writes it
    assert load_run_config(tmp_path / "run_config.yaml").model == config.model
    assert load_run_config(None, ["model=m"]).model.attn_implementation == "auto"


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


def test_bf16_under_zero_2_or_3_accumulates_gradients_in_fp32_unless_the_config_says_otherwise(tmp_path):
    config = load_run_config(None, [])
    notes = []

    def resolved(stage: int, **extra) -> dict:
        data = {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage}, **extra}
        return resolve_ds_config(write(tmp_path, data), config, world_size=2, gpu=True, model_config=MODEL_CONFIG, notes=notes)

    assert resolved(3)["data_types"] == {"grad_accum_dtype": "fp32"} and resolved(2)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert sum("data_types.grad_accum_dtype: fp32 (bf16 without it" in note for note in notes) == 2  # said, for the log
    assert resolved(3, data_types={"grad_accum_dtype": "bf16"})["data_types"] == {"grad_accum_dtype": "bf16"}  # said otherwise
    assert "data_types" not in resolved(1)  # DeepSpeed would swap in its BF16_Optimizer


FP16_DYNAMIC_SCALING = {
    "enabled": "auto",
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 16,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
"""The fp16 section both HF's and LLaMA-Factory's JSONs carry."""
HF_ZERO3 = {  # the keys and "auto" values of HF's documented ZeRO-3 JSON (its optimizer and scheduler included)
    "fp16": FP16_DYNAMIC_SCALING,
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
LLAMA_FACTORY_ZERO2 = {  # the keys of LLaMA-Factory's ds_z2_config.json
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "fp16": FP16_DYNAMIC_SCALING,
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 2,
        "allgather_partitions": True,
        "allgather_bucket_size": 5e8,
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "contiguous_gradients": True,
        "round_robin_gradients": True,
    },
}


def test_hugging_face_and_llama_factory_jsons_are_filled_as_hf_trainer_fills_them(tmp_path):
    config = load_run_config(None, ["train.micro_batch_size=3", "train.gradient_accumulation_steps=2", "train.gradient_clipping=0.5"])
    notes = []
    ds = resolve_ds_config(write(tmp_path, HF_ZERO3), config, world_size=2, gpu=True, model_config=MODEL_CONFIG, notes=notes)
    assert "optimizer" not in ds and "scheduler" not in ds
    hidden = MODEL_CONFIG["hidden_size"]
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == hidden * hidden and zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert zero["stage3_prefetch_bucket_size"] == decoder_layer_numel(MODEL_CONFIG)  # adept_ds's window: one layer ahead
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 12)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    said = "\n".join(notes)
    for line in [
        """optimizer: the JSON's AdamW section is all "auto": the run config's optimizer.* keys are used""",
        """scheduler: the JSON's WarmupLR section is all "auto": the run config's scheduler.* keys are used""",
        f"zero_optimization.reduce_bucket_size: auto = {hidden * hidden} (hidden_size^2 (HF's rule; h={hidden}))",
        f"zero_optimization.stage3_param_persistence_threshold: auto = {10 * hidden} (10 x hidden_size",
        "zero_optimization.stage3_prefetch_bucket_size: auto = ",
        "train_batch_size: auto = 12 (micro batch x accumulation x ranks)",
    ]:
        assert line in said, (line, said)
    ds = resolve_ds_config(write(tmp_path, LLAMA_FACTORY_ZERO2), config, world_size=2, gpu=False, model_config=MODEL_CONFIG)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8 and ds["bf16"]["enabled"] is False  # explicit kept; fp32 on CPU


@pytest.mark.parametrize(
    "ds, message",
    [
        ({"train_batch_size": 7}, r"train_batch_size=7 disagrees with the run config's global batch 4 = train.micro_batch_size 2 x "),
        (
            {"train_micro_batch_size_per_gpu": 4},
            r"train_micro_batch_size_per_gpu=4 disagrees with the run config's train.micro_batch_size=2",
        ),
        (
            {"gradient_accumulation_steps": 2},
            r"gradient_accumulation_steps=2 disagrees with the run config's train.gradient_accumulation_steps=1",
        ),
        (
            {"gradient_clipping": 0.5},
            r"gradient_clipping=0.5 disagrees with the run config's train.gradient_clipping=1.0; .*give train.gradient_clipping=0.5",
        ),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}, r"the 'optimizer' section sets values .*\"lr\": 0.0003.*optimizer\.\*"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}, r"the 'scheduler' section sets values"),
        ({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}, r"optimizer type 'Lamb': adept_ds trains with AdamW"),
        ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage=4: choose 0, 1, 2 or 3"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, r"bf16 and fp16 are both enabled; enable one"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"buffer_count": "auto"}}},
            r"'zero_optimization.offload_param.buffer_count' is \"auto\" but",
        ),
    ],
)
def test_ds_config_refusals_name_both_values(tmp_path, ds, message):
    config = load_run_config(None, [])
    with pytest.raises(ValueError, match=message) as refused:
        resolve_ds_config(write(tmp_path, ds), config, world_size=2, gpu=True, model_config=MODEL_CONFIG)
    assert "\n" not in str(refused.value)


def test_equal_values_and_a_bare_optimizer_type_are_accepted(tmp_path):
    config = load_run_config(None, [])
    equal = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    assert (
        resolve_ds_config(write(tmp_path, {**equal, "optimizer": {"type": "Adam"}}), config, 2, False, MODEL_CONFIG)["train_batch_size"]
        == 4
    )


def test_warmup_0_and_the_new_schedule_names_load():
    config = load_run_config(None, ["scheduler.type=warmup_stable_decay", "scheduler.warmup_steps=0", "scheduler.decay_ratio=0.2"])
    assert (config.scheduler.type, config.scheduler.warmup_steps, config.scheduler.decay_ratio) == ("warmup_stable_decay", 0, 0.2)
    assert load_run_config(None, ["report.to=none"]).report.to == [] and load_run_config(None, []).report.to == ["tensorboard"]
