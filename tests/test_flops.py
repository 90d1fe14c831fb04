"""The step FLOP model (adept_ds/run/flops.py) against torch's FlopCounterMode on what a training step really runs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from adept_ds.model.expand import expand_checkpoint
from adept_ds.model.families import get_family
from adept_ds.model.lm_loss import use_chunked_loss
from adept_ds.model.units import adept_units, full_model_units, set_trainable
from adept_ds.probe.layers import PROBE_FORMAT
from adept_ds.run.config import load_run_config
from adept_ds.run.flops import sample_flops, step_flops
from adept_ds.run.plan import model_shape
from adept_ds.training.activation_checkpointing import checkpoint_layers

TOKENS, BATCH = 24, 2


def build_models(root, family: str) -> dict:
    """A 6-layer model, its expansion after layers 2 and 4 (copies at 3 and 6 of 8), and a probe result."""
    original = make_tiny_model(root / "original", family, num_layers=6, tie=family == "qwen3")
    expand_checkpoint(original, root / "expanded", [2, 4], show_progress=False)
    probe = root / "probe.json"
    probe.write_text(json.dumps({"format": PROBE_FORMAT, "method": "mask", "scores": [5, 4, 0.1, 3, 0.2, 2], "base_loss": 1.0}))
    return {"family": family, "original": original, "expanded": root / "expanded", "probe": probe}


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def models(request, tmp_path_factory):
    return build_models(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("llama"), "llama")


def in_place_addmm(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """The counter's table has `addmm` but not the in-place `addmm_`, which the chunked loss accumulates the head's
    fp32 weight gradient with (pt_full): the same 2mkn."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted(models, method: str, chunked: bool, checkpointing: bool) -> tuple[int, int]:
    """(FlopCounterMode's count of one forward and backward as the trainer sets it up, the model's)."""
    expanded = method in ("adept", "llama_pro", "adept_no_stage2")
    model_dir = models["expanded" if expanded else "original"]
    config = load_run_config(None, [f"model={model_dir}", f"method={method}", f"probe={models['probe']}", "k=2"])
    shape = model_shape(config)
    family = get_family(models["family"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    if shape.trains_everything:
        units = full_model_units(model)
    else:
        units = adept_units(model, family, list(shape.trainable_layers))
    set_trainable(model, units)
    if chunked:
        use_chunked_loss(model, family)
    if checkpointing:
        checkpoint_layers(model, family, [name for unit in units for name in unit.param_names])
    batch = torch.randint(3, model.config.vocab_size, (BATCH, TOKENS))
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: in_place_addmm}) as counter:
        model(input_ids=batch, labels=batch).loss.backward()
    return counter.get_total_flops(), BATCH * sample_flops(shape, TOKENS, checkpointing).train


@pytest.mark.parametrize("method", ["adept", "llama_pro", "pt_full", "adept_no_stage1", "adept_no_stage2"])
def test_the_flop_model_counts_what_a_step_runs_for_every_family_and_method(models, method):
    # Eager attention: its products are plain bmm the counter sees (CPU SDPA's kernel is not in its table); the
    # model counts them as SDPA's formula does (the same full T x T square).
    measured, predicted = counted(models, method, chunked=False, checkpointing=False)
    assert predicted == measured, (measured, predicted)


@pytest.mark.parametrize("method", ["adept", "pt_full"])
@pytest.mark.parametrize("chunked,checkpointing", [(True, False), (False, True), (True, True)])
def test_the_flop_model_follows_the_chunked_loss_and_activation_checkpointing(llama_models, method, chunked, checkpointing):
    """One family: the loss and recompute terms do not depend on it (the family terms are checked above)."""
    measured, predicted = counted(llama_models, method, chunked, checkpointing)
    assert predicted == measured, (measured, predicted)


def test_a_frozen_backbone_step_is_well_below_six_n_and_the_passes_amortise(llama_models):
    config = load_run_config(None, [f"model={llama_models['expanded']}", "method=adept"])
    shape = model_shape(config)
    plain = step_flops(shape, TOKENS, global_batch=8)
    assert plain.total == plain.train == 8 * sample_flops(shape, TOKENS).train and plain.train < plain.six_n
    with_passes = step_flops(shape, TOKENS, 8, importance_samples=4, importance_interval=2, validation_samples=6, eval_interval=3)
    assert with_passes.importance == 2 * sample_flops(shape, TOKENS).train
    assert with_passes.validation == 2 * sample_flops(shape, TOKENS, backward=False).forward
