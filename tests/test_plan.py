"""`adept-ds plan`: its activation model against what HF's code saves, its shapes against real models, its CLI.

The planner's checkpoint bytes are checked against a real 2-rank ZeRO-3 checkpoint in
tests/test_engine_distributed.py; its memory against real runs at 0.1-1.5B by benchmarks/plan_check.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_model, tiny_config
from train_setup import REPO

from adept_ds.run.config import load_run_config
from adept_ds.run.plan import GPU_RESERVE_BYTES, layer_activation_bytes, model_shape, plan_run

SHAPES = REPO / "launch" / "configs" / "shapes"


def saved_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves for backward in one trainable decoder layer (weights excluded), by saved-tensor hooks."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    hidden = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None]
    cos, sin = LlamaRotaryEmbedding(config)(hidden, positions)
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos.to(dtype), sin.to(dtype)))
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4},
        {"hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 8, "num_key_value_heads": 2},  # GQA
        {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32},
    ],
)
def test_the_activation_model_is_what_hf_llama_saves(shape, dtype):
    config = tiny_config("llama", num_layers=1, **shape)
    tokens = 48
    assert layer_activation_bytes(config.to_dict(), tokens, dtype.itemsize) == saved_bytes(config, tokens, dtype)


def _config(model, *extra):
    return load_run_config(None, [f"model={model}", f"deepspeed={REPO / 'ds_configs' / 'zero3.json'}", *extra])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_planned_tensors_are_the_models(tmp_path, family):
    model = make_tiny_model(tmp_path / family, family=family, num_layers=3, tie=family == "qwen2")
    from transformers import AutoModelForCausalLM

    real = {name: p.numel() for name, p in AutoModelForCausalLM.from_pretrained(model).named_parameters()}
    shape = model_shape(_config(model, "method=pt_full"))
    assert sum(t.numel for t in shape.tensors) == sum(real.values())
    assert len(shape.tensors) == len(real)


def test_an_unexpanded_model_is_planned_with_k_copies_at_the_worst_placement(tmp_path):
    model = make_tiny_model(tmp_path / "base", num_layers=4)
    shape = model_shape(_config(model), k=2)
    assert shape.num_layers == 6 and len(shape.trainable_layers) == 2
    assert shape.backward_layers == 5  # the lowest copy right after layer 0: every layer but the first gets backward
    layer = sum(t.numel for t in shape.tensors if t.layer == 0)
    assert sum(t.numel for t in shape.trainable()) == 2 * layer
    with pytest.raises(ValueError, match="--k 9: plan between 1 and 4 copies"):
        model_shape(_config(model), k=9)


def test_checkpointing_and_more_ranks_shrink_the_plan_as_modelled():
    config = _config(SHAPES / "llama-3-8b", "data.block_size=4096", "train.micro_batch_size=1", "method=pt_full")
    shape = model_shape(config)
    plain = plan_run(config, shape, 8, gpu=True, device_bytes=80 * 2**30).phases["train"]
    ckpt_config = _config(
        SHAPES / "llama-3-8b", "data.block_size=4096", "train.micro_batch_size=1", "method=pt_full", "train.activation_checkpointing=true"
    )
    checkpointed = plan_run(ckpt_config, shape, 8, gpu=True, device_bytes=80 * 2**30).phases["train"]
    activations = next(v for k, v in plain.terms.items() if k.startswith("activations"))
    kept = next(v for k, v in checkpointed.terms.items() if k.startswith("activations"))
    per_layer = layer_activation_bytes(shape.config, 4096, 2)
    assert activations == 32 * per_layer
    assert kept == 32 * 4096 * 4096 * 2  # each layer's bf16 input
    assert checkpointed.terms["one layer recomputed"] == per_layer  # its peak is in backward, not at the loss
    # bf16 on GPU: 2-byte partitions of all 8.03B parameters, 12 + 4 bytes per parameter of fp32 state
    assert plain.terms["parameters (partitions + persistent norms)"] == pytest.approx(8.03e9 * 2 / 8, rel=0.01)
    assert plain.terms["fp32 master + AdamW moments"] == pytest.approx(8.03e9 * 12 / 8, rel=0.01)
    wider = plan_run(config, shape, 64, gpu=True, device_bytes=None).phases["train"]
    assert wider.terms["fp32 master + AdamW moments"] == pytest.approx(plain.terms["fp32 master + AdamW moments"] / 8, rel=1e-6)


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "adept_ds.cli", "plan", *args], capture_output=True, text=True, cwd=REPO)


def test_plan_says_what_does_not_fit_and_what_would():
    run = REPO / "launch" / "configs" / "llama3_adept_4k.yaml"
    done = plan_cli("--config", str(run), "--nodes", "1", "--gpus-per-node", "8", "--k", "16", f"model={SHAPES / 'llama-3-70b'}")
    assert done.returncode == 3, done.stderr  # a submit script can stop on it (2: bad input)
    assert "train: " in done.stdout and "DOES NOT FIT" in done.stdout.split("importance:")[0]
    assert "does not fit in any layout" in done.stdout and "see `adept-ds plan`" not in done.stdout
    assert "suggest: train.activation_checkpointing=true fits" in done.stdout
    assert "checkpoint: " in done.stdout and "frozen weights are not saved" in done.stdout
    as_json = plan_cli(
        "--config",
        str(run),
        "--json",
        "--nodes",
        "1",
        "--k",
        "16",
        "train.activation_checkpointing=true",
        f"model={SHAPES / 'llama-3-70b'}",
    )
    phases = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert phases["train"]["total"] + GPU_RESERVE_BYTES <= 80 * 2**30  # the suggestion holds when taken
    assert as_json.returncode == 0 and phases["fits"] == {name: True for name in ("train", "importance", "probe", "export")}


def test_plan_refuses_bad_input(tmp_path):
    run = REPO / "launch" / "configs" / "llama3_adept_4k.yaml"
    done = plan_cli("--config", str(run), "--nodes", "0")
    assert done.returncode != 0 and "--nodes 0: need at least 1" in done.stderr
    done = plan_cli("--config", str(run), f"model={tmp_path}")
    assert done.returncode != 0 and "no config.json there" in done.stderr


def test_a_run_that_fits_without_checkpointing_is_told_it_can_go_faster():
    from adept_ds.run.plan_report import suggestions

    config = _config(SHAPES / "llama-3-8b", "data.block_size=4096", "train.micro_batch_size=1", "train.activation_checkpointing=true")
    shape = model_shape(config, k=8)
    plan = plan_run(config, shape, 8, gpu=True, device_bytes=80 * 2**30)
    assert plan.fits_training()
    (tip,) = suggestions(config, shape, plan, nodes=1, gpus_per_node=8)
    assert tip.startswith("train.activation_checkpointing=false (faster) fits")
    tight = plan_run(config, shape, 8, gpu=True, device_bytes=24 * 2**30)  # fits only with checkpointing
    assert tight.fits_training() and suggestions(config, shape, tight, nodes=1, gpus_per_node=8) == []
