"""train.frozen_weights on 2 real ZeRO-3 ranks (CPU, gloo): `replicated` keeps the frozen backbone whole on every
rank and leaves only the trainable units partitioned, gathers only those per step, and trains, measures importance,
checkpoints and exports exactly as the sharded layout does. The automatic choice follows the memory plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from corpora import sentences, write_jsonl
from distributed import read_rank_results, run_deepspeed
from model_checks import load_state
from tiny_models import make_tiny_model
from train_setup import REPO, overrides

from adept_ds.model.expand import expand_checkpoint
from adept_ds.model.families import decoder_layer_numel
from adept_ds.run.config import load_run_config
from adept_ds.run.ds_config import DEEPSPEED_WINDOW, WINDOW_LAYERS
from adept_ds.run.memory_layout import choose_layout
from adept_ds.run.plan import model_shape, plan_run

pytestmark = pytest.mark.dist


def tied_inputs(root: Path, copied: tuple[int, ...] = (1, 2)) -> dict[str, Path]:
    """A tiny model whose LM head is its embedding (as SmolLM2's), with copies after layers `copied` of 4."""
    original = make_tiny_model(root / "original", "llama", num_layers=4, tie=True)
    expand_checkpoint(original, root / "expanded", list(copied), show_progress=False)
    return {
        "original": original,
        "expanded": root / "expanded",
        "domain": write_jsonl(root / "domain.jsonl", sentences(240, seed=1)),
        "general": write_jsonl(root / "general.jsonl", sentences(160, seed=2)),
    }


def ds_config(root: Path, name: str, window: dict) -> Path:
    # Every tiny tensor is below the shipped persistence threshold (always gathered): 0 makes ZeRO-3 gather them all.
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update({"stage3_param_persistence_threshold": 0, **window})
    (root / name).write_text(json.dumps(config))
    return root / name


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen_weights")
    inputs = tied_inputs(root)
    model_config = json.loads((inputs["expanded"] / "config.json").read_text())
    layer = decoder_layer_numel(model_config)
    # What the "auto" window was before it planned memory: ~3 layers, whatever memory there is.
    layered = {key: min(WINDOW_LAYERS[key] * layer, default) for key, default in DEEPSPEED_WINDOW.items()}
    auto = ds_config(root, "auto.json", {})
    # hpZ: 4 ranks as 2 "nodes" of 2, with the same global batch and probe batch as the 2-rank runs.
    hpz = {"train.zeropp": "hpz", "train.hpz_ranks": 2, "train.micro_batch_size": 1, "importance.batch_size": 1}
    runs = {
        "before": (2, {"train.frozen_weights": "sharded", "deepspeed": ds_config(root, "layered.json", layered)}),
        "replicated": (2, {"train.frozen_weights": "replicated", "deepspeed": auto}),
        "hpz": (4, {"train.frozen_weights": "sharded", "deepspeed": auto, **hpz}),
        "qwz": (2, {"train.frozen_weights": "sharded", "deepspeed": auto, "train.zeropp": "qwz"}),
    }
    results = {}
    for name, (ranks, extra) in runs.items():
        out = root / f"out_{name}"
        out.mkdir()
        run_deepspeed("frozen_layout.py", out, *overrides(inputs, root / name, **extra), num_procs=ranks)
        results[name] = (read_rank_results(out, ranks), out)
    return inputs, results


def test_replicated_keeps_frozen_weights_whole_and_partitions_only_the_copies(layouts):
    inputs, results = layouts
    trainable_prefixes = ("model.layers.2.", "model.layers.4.")  # the copies after layers 1 and 2
    base = load_state(inputs["expanded"])
    for rank in results["replicated"][0]:
        assert rank["layout"] == "replicated"
        assert set(rank["partitioned"]) == {name for name in base if name.startswith(trainable_prefixes)}
        for numel, local in rank["partitioned"].values():
            assert local == math.ceil(numel / 2)  # this rank's ZeRO-3 partition
        frozen = {name: t.numel() for name, t in base.items() if not name.startswith(trainable_prefixes)}
        assert rank["whole"] == frozen  # every frozen tensor whole on this rank (the tied head is the embedding)
    for rank in results["before"][0]:
        assert set(rank["partitioned"]) == set(base)
        assert all(local == math.ceil(numel / 2) for numel, local in rank["partitioned"].values())
        assert rank["whole"] == {}


def test_replicated_gathers_only_the_trainable_tensors(layouts):
    """The bound: a step all-gathers at most the trainable tensors twice (forward, backward); the wide window the
    memory plan allows here gathers them once. The sharded layout gathers every frozen layer besides."""
    inputs, results = layouts
    base = load_state(inputs["expanded"])
    trainable_bytes = sum(t.numel() * 4 for name, t in base.items() if name.startswith(("model.layers.2.", "model.layers.4.")))
    frozen_bytes = sum(t.numel() * 4 for t in base.values()) - trainable_bytes
    for rank in results["replicated"][0]:
        assert rank["wide_window"]
        assert rank["gathered_bytes_per_step"] == [trainable_bytes, trainable_bytes]
    for rank in results["before"][0]:
        assert all(gathered >= frozen_bytes for gathered in rank["gathered_bytes_per_step"])
        assert all(gathered > 2 * trainable_bytes for gathered in rank["gathered_bytes_per_step"])


def test_replicated_trains_measures_importance_checkpoints_and_exports_like_sharded(layouts):
    _, results = layouts
    (before, before_out), (replicated, replicated_out) = results["before"], results["replicated"]
    assert replicated[0]["losses"] == pytest.approx(before[0]["losses"], rel=1e-6)
    assert replicated[0]["importance"] == pytest.approx(before[0]["importance"], rel=1e-6)
    assert replicated[0]["checkpoint_files"] == before[0]["checkpoint_files"]
    for rank in (*before, *replicated):  # the checkpoint continues the run exactly
        assert rank["step_after_load"] == rank["step_after_save"]
    a, b = load_state(before_out / "final"), load_state(replicated_out / "final")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)


def test_auto_takes_the_first_layout_that_fits(tmp_path):
    """replicated with the wide window when memory allows, then with the layer window, then sharded likewise;
    an explicit choice is kept; pt_full has nothing frozen; unknown memory takes the smallest layout. Four copies:
    more trainable layers than the ~3-layer window holds, so the wide window costs memory even when replicated."""
    inputs = tied_inputs(tmp_path, copied=(0, 1, 2, 3))
    config = load_run_config(None, overrides(inputs, tmp_path / "run"))
    shape = model_shape(config)
    needed = {}
    for frozen in ("replicated", "sharded"):
        for wide in (True, False):
            plan = plan_run(config, shape, 2, False, None, frozen, wide)
            needed[frozen, wide] = max(plan.needed(phase) for phase in ("train", "importance"))
    assert needed["replicated", True] > needed["replicated", False] and needed["sharded", True] > needed["sharded", False]

    def chosen(memory, frozen="auto", method="adept"):
        changed = load_run_config(None, overrides(inputs, tmp_path / "run", **{"train.frozen_weights": frozen, "method": method}))
        layout = choose_layout(changed, 2, False, memory)
        return layout.frozen_weights, layout.wide_window

    order = [("replicated", True), ("replicated", False), ("sharded", True), ("sharded", False)]
    seen = set()
    for memory in sorted(needed.values()):
        expected = next(layout for layout in order if needed[layout] <= memory)
        assert chosen(memory) == expected
        seen.add(expected)
    assert seen >= {("replicated", True), ("replicated", False)}  # on this tiny model replicated is never the larger
    assert chosen(min(needed.values()) - 1) == min(order, key=needed.get)  # nothing fits: the smallest layout
    assert chosen(None) == ("sharded", False)
    assert chosen(10 * needed["replicated", True], frozen="sharded") == ("sharded", True)
    assert chosen(needed["sharded", True] - 1, frozen="sharded") == ("sharded", False)
    assert chosen(10 * needed["replicated", True], method="pt_full")[0] == "sharded"


def test_hpz_keeps_the_frozen_backbone_inside_a_node_after_the_first_step(layouts):
    """ZeRO++ hpZ over 2 of 4 ranks: every weight gets a secondary shard over its group of 2, and from the second
    step on only the trainable copies are gathered across groups (across nodes, on a cluster); losses, importance
    and the export equal the 2-rank sharded run's (the same global batches: rel 1e-5 for the other rank count)."""
    inputs, results = layouts
    (hpz, hpz_out), (before, before_out) = results["hpz"], results["before"]
    base = load_state(inputs["expanded"])
    trainable = {name for name in base if name.startswith(("model.layers.2.", "model.layers.4."))}
    trainable_bytes = sum(base[name].numel() * 4 for name in trainable)
    for rank in hpz:
        assert rank["hpz_ranks"] == 2 and rank["layout"] == "sharded"
        assert set(rank["secondary"]) >= set(base) - trainable  # every frozen weight keeps its node-local shard
        for name, numel in rank["secondary"].items():
            assert numel == math.ceil(base[name].numel() / 2)
        for gathered, inside in zip(rank["gathered_bytes_per_step"], rank["subgroup_bytes_per_step"]):
            assert gathered - inside <= trainable_bytes  # across groups: at most the copies, once
            assert inside >= gathered - trainable_bytes > 0
    for rank in before:  # without hpZ everything is gathered over the whole world
        assert rank["subgroup_bytes_per_step"] == [0, 0]
    assert hpz[0]["losses"] == pytest.approx(before[0]["losses"], rel=1e-5)
    assert hpz[0]["step_after_load"] == hpz[0]["step_after_save"] == pytest.approx(before[0]["step_after_save"], rel=1e-5)
    assert hpz[0]["importance"] == pytest.approx(before[0]["importance"], rel=1e-5)
    a, b = load_state(before_out / "final"), load_state(hpz_out / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_qwz_gathers_int8_and_trains_checkpoints_and_exports(layouts):
    """ZeRO++ qwZ on 2 ranks (CPU: DeepSpeed's own qwZ path, with adept_ds.run.zeropp.TorchQuantizer as its quantizer):
    a step gathers every weight once as int8 plus a scale per group, a quarter of fp32's bytes; the losses follow
    the exact run's within the quantization error; a checkpoint continues the run exactly; the export holds the
    exact fp32 masters, and the frozen weights as they were."""
    inputs, results = layouts
    (qwz, qwz_out), (before, _) = results["qwz"], results["before"]
    base = load_state(inputs["expanded"])
    numel = sum(t.numel() for t in base.values())
    for rank in qwz:
        for gathered in rank["gathered_bytes_per_step"]:
            assert numel <= gathered <= 1.05 * numel  # int8 weights, fp32 scales; fp32 would be 4 * numel
        assert rank["step_after_load"] == rank["step_after_save"]
    assert qwz[0]["losses"][0] == pytest.approx(before[0]["losses"][0], rel=1e-3)  # the first forward: quantized weights
    assert qwz[0]["losses"] != before[0]["losses"]
    assert qwz[0]["losses"] == pytest.approx(before[0]["losses"], rel=0.02)
    exported = load_state(qwz_out / "final")
    trainable = ("model.layers.2.", "model.layers.4.")
    for name, tensor in base.items():
        if not name.startswith(trainable):
            assert torch.equal(exported[name], tensor)
    assert any(not torch.equal(exported[name], base[name]) for name in base if name.startswith(trainable))
