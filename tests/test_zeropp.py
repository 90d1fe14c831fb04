"""train.zeropp: how the DeepSpeed config gets ZeRO++'s hpZ and qwZ, which quantized options are refused, the CPU
stand-in for DeepSpeed's quantizer, and what the planner counts for hpZ. Both on real ranks: tests/test_frozen_weights.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_config import MODEL_CONFIG, write
from test_plan import SHAPES, plan_cli
from train_setup import REPO

from adept_ds.run.config import load_run_config
from adept_ds.run.ds_config import resolve_ds_config
from adept_ds.run.plan import model_shape, plan_run
from adept_ds.run.zeropp import TorchQuantizer, describe

ZERO3 = {"zero_optimization": {"stage": 3}}


def resolved(tmp_path, overrides=(), data=ZERO3, world_size=8, gpu=False) -> dict:
    config = load_run_config(None, list(overrides))
    return resolve_ds_config(write(tmp_path, data), config, world_size, gpu, MODEL_CONFIG)


def test_off_is_off_in_yaml_and_on_the_command_line(tmp_path):
    """YAML 1.1 reads an unquoted off as False: the setting still reads it as "off"."""
    assert load_run_config(None, ["train.zeropp=off"]).train.zeropp == "off"
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  zeropp: off\n")
    assert load_run_config(run).train.zeropp == "off"
    with pytest.raises(ValueError, match="train.zeropp='on': choose one of off, hpz, qwz, hpz\\+qwz"):
        load_run_config(None, ["train.zeropp=on"])


def test_hpz_takes_the_ranks_of_a_node_and_is_off_where_one_group_spans_the_world(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert "zero_hpz_partition_size" not in resolved(tmp_path)["zero_optimization"]  # off by default
    ds = resolved(tmp_path, ["train.zeropp=hpz"])
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 4
    config = load_run_config(None, ["train.zeropp=hpz"])
    assert (
        describe(ds, config, 8, "sharded")
        == "ZeRO++ hpZ: secondary shards over 4 ranks (2 groups); frozen weights stay node-local after step 1"
    )
    assert describe(ds, config, 8, "replicated").endswith("the frozen weights are replicated, so it serves the trainable units only")
    assert resolved(tmp_path, ["train.zeropp=hpz", "train.hpz_ranks=2"])["zero_optimization"]["zero_hpz_partition_size"] == 2
    one_node = resolved(tmp_path, ["train.zeropp=hpz"], world_size=4)  # e.g. a job requeued onto one node
    assert "zero_hpz_partition_size" not in one_node["zero_optimization"]
    assert describe(one_node, config, 4, "sharded") == "ZeRO++ hpZ off: a secondary shard group of 4 ranks would span all 4 (one node)"


@pytest.mark.parametrize(
    "overrides,data,message",
    [
        (["train.zeropp=hpz", "train.hpz_ranks=3"], ZERO3, r"secondary shards over 3 ranks: the world size 8 is not a multiple of it"),
        (["train.zeropp=hpz", "train.hpz_ranks=1"], ZERO3, r"train.hpz_ranks=1: a secondary shard needs at least 2 ranks"),
        (
            ["train.zeropp=hpz"],
            {"zero_optimization": {"stage": 2}},
            r"train.zeropp=hpz: ZeRO\+\+ is a ZeRO-3 option, and .* has ZeRO stage 2",
        ),
        (
            ["train.zeropp=hpz", "train.hpz_ranks=2"],
            {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}},
            r"zero_hpz_partition_size=4 and train.zeropp=hpz over 2 ranks disagree",
        ),
        (["train.zeropp=lpz"], ZERO3, r"train.zeropp='lpz': choose one of off, hpz, qwz, hpz\+qwz"),
        (["train.hpz_ranks=-1"], ZERO3, r"train.hpz_ranks=-1: need an int >= 0"),
    ],
)
def test_bad_zeropp_settings_are_named(tmp_path, overrides, data, message):
    with pytest.raises(ValueError, match=message):
        resolved(tmp_path, overrides, data)


def quantized(option: str) -> dict:
    return {"zero_optimization": {"stage": 3, option: True}}


def test_qwz_is_set_by_name_and_the_options_that_cannot_work_are_refused(tmp_path):
    for gpu in (False, True):  # on CPU the torch stand-in quantizes (engine: use_cpu_quantizer)
        ds = resolved(tmp_path, ["train.zeropp=qwz"], gpu=gpu)
        assert ds["zero_optimization"]["zero_quantized_weights"] is True
    assert "zero_quantized_weights" not in resolved(tmp_path)["zero_optimization"]  # never by itself
    config = load_run_config(None, ["train.zeropp=hpz+qwz", "train.hpz_ranks=4"])
    both = resolved(tmp_path, ["train.zeropp=hpz+qwz", "train.hpz_ranks=4"])["zero_optimization"]
    assert both["zero_quantized_weights"] is True and both["zero_hpz_partition_size"] == 4
    assert describe({"zero_optimization": both}, config, 8, "sharded").endswith(
        "qwZ: weights gathered as int8 (lossy; the fp32 masters stay exact)"
    )
    with pytest.raises(ValueError, match="zero_quantized_nontrainable_weights is broken in DeepSpeed 0.19.8"):
        resolved(tmp_path, data=quantized("zero_quantized_nontrainable_weights"), gpu=True)
    with pytest.raises(ValueError, match="zero_quantized_gradients is on, but DeepSpeed's quantized reduction is CUDA-only"):
        resolved(tmp_path, data=quantized("zero_quantized_gradients"), gpu=False)
    assert resolved(tmp_path, data=quantized("zero_quantized_gradients"), gpu=True)["zero_optimization"]["zero_quantized_gradients"]
    with pytest.raises(ValueError, match=r"train.zeropp=qwz: ZeRO\+\+ is a ZeRO-3 option, and .* has ZeRO stage 2"):
        resolved(tmp_path, ["train.zeropp=qwz"], {"zero_optimization": {"stage": 2}})


def test_the_cpu_quantizer_is_symmetric_int8_per_group():
    """The kernel's arithmetic: absmax per group maps to +-128 steps, round half to even, 1/scale kept per group;
    an all-zero group stays zero; a value under half a step of its group's absmax becomes exactly 0 (benchmarks/
    qwz_kernel_check.py holds it against DeepSpeed's CUDA kernel on a GPU)."""
    quantizer = TorchQuantizer()
    values = torch.tensor([0.5, -0.25, 0.001, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, -2.0, 1.0, 0.0078125])
    quantized, inverse = quantizer.quantize(values, 3, 8, quantizer.Symmetric)
    assert quantized.dtype == torch.int8 and inverse.shape == (3,)
    assert inverse.tolist() == pytest.approx([1 / 128, 1.0, 2 / 128])
    assert quantized.tolist() == [64, -32, 0, 127, 0, 0, 0, 0, 127, -128, 64, 0]  # 1.0 * 128 clamps to 127
    restored = quantizer.dequantize(quantized, inverse, 3, 8, quantizer.Symmetric)
    assert restored.dtype == torch.half
    assert restored.float().tolist() == pytest.approx([0.5, -0.25, 0.0, 127 / 128, 0, 0, 0, 0, 127 / 64, -2.0, 1.0, 0.0])
    big = torch.randn(64_000, generator=torch.Generator().manual_seed(0))
    q, s = quantizer.quantize(big, 8, 8, quantizer.Symmetric)
    step = s.repeat_interleave(8000)
    error = (quantizer.dequantize(q, s, 8, 8, quantizer.Symmetric).float() - big.half().float()).abs()
    slack = big.abs() * 2**-10  # fp16's rounding of the result
    assert (error <= step + slack).all()  # a group's +absmax lands on 128 and is clamped to 127: one step off
    assert (error > step / 2 + slack).sum() <= 8  # elsewhere round to nearest: half a step at most
    with pytest.raises(ValueError, match="symmetric 8-bit only"):
        quantizer.quantize(big, 8, 4, quantizer.Symmetric)


def test_the_plan_counts_hpz_secondary_shards(tmp_path):
    """1/H of every partitioned tensor, in the weights' dtype: all of them with sharded frozen weights, the trainable
    ones with replicated; norms below the persistence threshold have none."""
    ds = tmp_path / "zero3.json"
    ds.write_text((REPO / "ds_configs" / "zero3.json").read_text())
    base = [f"model={SHAPES / 'llama-3-8b'}", f"deepspeed={ds}", "method=llama_pro"]
    for frozen in ("sharded", "replicated"):
        with_hpz = load_run_config(None, [*base, "train.zeropp=hpz", "train.hpz_ranks=8"])
        shape = model_shape(with_hpz, k=4)
        plan = plan_run(with_hpz, shape, 16, True, None, frozen)
        persist = json.loads(ds.read_text())["zero_optimization"]["stage3_param_persistence_threshold"]
        managed = shape.trainable() if frozen == "replicated" else shape.tensors
        expected = sum(math.ceil(t.numel / 8) * 2 for t in managed if t.numel >= persist)
        assert plan.phases["train"].terms["hpZ secondary shards (1/8 of ZeRO-managed weights)"] == expected
        without = plan_run(load_run_config(None, base), shape, 16, True, None, frozen)
        assert plan.phases["train"].total - without.phases["train"].total == expected


def test_plan_takes_the_node_size_for_hpz():
    run = REPO / "launch" / "configs" / "llama3_adept_4k.yaml"
    done = plan_cli(
        "--config", str(run), "--nodes", "2", "--gpus-per-node", "4", "--k", "4", "train.zeropp=hpz", f"model={SHAPES / 'llama-3-8b'}"
    )
    assert done.returncode == 0, done.stderr
    assert "hpZ secondary shards (1/4 of ZeRO-managed weights)" in done.stdout
    both = plan_cli(
        "--config", str(run), "--nodes", "2", "--gpus-per-node", "4", "--k", "4", "train.zeropp=hpz+qwz", f"model={SHAPES / 'llama-3-8b'}"
    )
    assert both.returncode == 0, both.stderr
    assert "hpZ secondary shards (1/4 of ZeRO-managed weights)" in both.stdout


def test_the_node_size_comes_from_the_launcher(monkeypatch):
    """hpZ's default group, the automatic thread count and the CPU memory plan all read the node's ranks from one
    place: LOCAL_WORLD_SIZE (set by discover_ranks for every launcher), else DeepSpeed's LOCAL_SIZE."""
    import os

    from adept_ds.runtime.distributed import local_world_size, threads_per_rank

    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert local_world_size() == 1 and local_world_size(16) == 16
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert local_world_size(16) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_world_size(16) == 2
    assert threads_per_rank() == max(1, len(os.sched_getaffinity(0)) // 2)
    assert threads_per_rank(3) == 3
