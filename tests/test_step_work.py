"""What an ADEPT step computes and holds, checked structurally (timings and memory figures are the
benchmark suite's job): backward stops at the lowest trainable layer, only trainable tensors carry
gradients and optimizer state, and ZeRO-3 keeps only a few layers' weights gathered at once. A
regression here (say, `enable_input_require_grads` for gradient checkpointing) would make every step
run backward through the whole network."""

import json
from pathlib import Path

import pytest
from distributed import read_rank_results, run_deepspeed
from train_setup import make_training_inputs, overrides

from adept_ds.model.expand import expand_checkpoint
from adept_ds.run.config import load_run_config
from adept_ds.run.ds_config import DEEPSPEED_WINDOW
from adept_ds.run.plan import GIB, model_shape, plan_run

pytestmark = pytest.mark.dist
REPO = Path(__file__).parent.parent


def two_steps(tmp_path, name: str, inputs: dict, zero_settings: dict, **extra) -> list[dict]:
    # The tiny model's tensors are all below the shipped persistence threshold (always gathered): use 0.
    ds_config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds_config["zero_optimization"].update({"stage3_param_persistence_threshold": 0, **zero_settings})
    (tmp_path / f"{name}.json").write_text(json.dumps(ds_config))
    out = tmp_path / name
    out.mkdir()
    extra = {"train.max_steps": 2, "deepspeed": tmp_path / f"{name}.json", "train.frozen_weights": "sharded", **extra}
    args = overrides(inputs, tmp_path / f"run_{name}", **extra)
    run_deepspeed("backward_reach.py", out, *args, f"train.memory_gb={layered_window_memory_gb(args)!r}")
    return read_rank_results(out, world_size=2)


def layered_window_memory_gb(args: list[str]) -> float:
    """Memory per rank in which an "auto" window is the ~3-layer one: what the plan needs with it, less than with
    DeepSpeed's wide window (memory_layout.choose_layout). A config with the window set explicitly needs the same."""
    config = load_run_config(None, args)
    shape = model_shape(config)
    needed = {}
    for wide in (True, False):
        plan = plan_run(config, shape, 2, False, None, "sharded", wide)
        needed[wide] = max(plan.needed(phase) for phase in ("train", "importance"))
    return needed[False] / GIB


def test_backward_stops_at_the_lowest_copy_frozen_tensors_have_no_optimizer_state_and_few_layers_are_gathered(tmp_path):
    inputs = make_training_inputs(tmp_path)
    expanded = tmp_path / "top_expanded"  # copies after layers 2 and 3 of 4: new layers 3 and 5 of 6
    expand_checkpoint(inputs["original"], expanded, [2, 3], show_progress=False)
    inputs = {**inputs, "expanded": expanded}
    results = two_steps(tmp_path, "auto_window", inputs, {})
    for result in results:
        assert result["copied_layers"] == [3, 5]
        assert result["backward_layers"] == [3, 4, 5]  # layers 0-2 lie below every copy: no backward at all
        assert all(name.startswith(("model.layers.3.", "model.layers.5.")) for name in result["requires_grad"])
    # ZeRO-3 master weights (and so Adam state) exist for the copies only, split across the ranks.
    partition = sum(r["optimizer_partition_elements"] for r in results)
    trainable = results[0]["trainable_elements"]
    assert trainable <= partition <= trainable + 2 * 64  # padding to the ranks' alignment at most

    # ZeRO-3's window ("auto" where wider does not fit: prefetch one layer, about three live, release once used) bounds what is
    # gathered or in flight at once: three layers, plus the embedding (a needed fetch is never deferred). DeepSpeed's own
    # defaults gather this model whole and keep every layer above the lowest copy from forward to backward.
    first = results[0]
    window = 3 * first["layer_elements"] + first["embedding_elements"]
    defaults = two_steps(tmp_path, "deepspeed_defaults", inputs, DEEPSPEED_WINDOW)
    assert all(r["max_live_gathered_elements"] <= window for r in results)
    assert all(r["max_live_gathered_elements"] > window for r in defaults)
    # The window changes what is gathered when, never the arithmetic (the head is gathered inside the chunked loss).
    assert results[0]["losses"] == pytest.approx(defaults[0]["losses"], rel=1e-6)

    # Activation checkpointing reruns the layers from the lowest copy up in backward, re-gathering their
    # partitioned weights, frozen ones included (non-reentrant; DeepSpeed keeps them through the recompute):
    # the same losses, and still within the window.
    checkpointed = two_steps(tmp_path, "checkpointed", inputs, {}, **{"train.activation_checkpointing": True})
    assert all(r["forward_calls"] == [2] * 6 for r in results)
    for result in checkpointed:
        assert result["forward_calls"] == [2, 2, 2, 4, 4, 4] and result["backward_layers"] == [3, 4, 5]
        assert result["max_live_gathered_elements"] <= window
    assert checkpointed[0]["losses"] == pytest.approx(results[0]["losses"], rel=1e-5)
