"""`adept-ds plan --tokens`: the step-time terms on hand-computed cases, the CLI's time lines, and its refusals."""

from __future__ import annotations

import json
import math

import pytest
from test_plan import SHAPES, plan_cli
from train_setup import REPO

from adept_ds.run.flops import StepFlops
from adept_ds.run.plan import ModelShape, Tensor
from adept_ds.run.step_time import NVLINK_GBPS, StepTraffic, micro_batch_gathers, step_time, step_traffic

RUN = REPO / "launch" / "configs" / "llama3_adept_4k.yaml"


def toy_shape(trainable=(2,), trains_everything=False, tied=False) -> ModelShape:
    """Four layers of one 100-element weight, an embedding of 1000 and (untied) a head of 1000."""
    tensors = [Tensor("model.embed_tokens.weight", 1000, None), Tensor("model.norm.weight", 10, None)]
    tensors += [] if tied else [Tensor("lm_head.weight", 1000, None)]
    tensors += [Tensor(f"layers.{layer}.mlp.up_proj.weight", 100, layer) for layer in range(4)]
    config = {"model_type": "llama", "hidden_size": 10, "num_attention_heads": 1, "vocab_size": 100}
    return ModelShape(config, tuple(tensors), 4, trainable, trains_everything, "", ())


def test_traffic_counts_each_gather_and_the_gradients_as_zero3_makes_them():
    # Sharded, ~3-layer window, 4 ranks (a ring moves 3/4), 2 micro-batches, 2 bytes: forward gathers all 2410
    # elements; backward layers 2-3, the final norm and the head (200 + 10 + 1000; not the untied embedding);
    # the trainable layer's 100 gradients are reduce-scattered.
    traffic = step_traffic(toy_shape(), world_size=4, micro_batches=2, dtype_bytes=2)
    assert traffic == StepTraffic(math.ceil(0.75 * 2 * (2410 + 1210 + 100) * 2), 0)
    # A window that keeps 1100 elements live from forward spares backward the head (1000), the norm (10) and 90 of
    # layer 3's weight (top first); one that keeps everything spares all of it. Replicated gathers only what trains.
    assert step_traffic(toy_shape(), 4, 2, 2, live=1100).network == math.ceil(0.75 * 2 * (2410 + 110 + 100) * 2)
    assert step_traffic(toy_shape(), 4, 2, 2, live=10**9).network == math.ceil(0.75 * 2 * (2410 + 100) * 2)
    assert step_traffic(toy_shape(), 4, 2, 2, frozen_weights="replicated").network == math.ceil(0.75 * 2 * (100 + 100 + 100) * 2)
    # qwZ gathers every weight as int8, forward and backward; hpZ moves frozen gathers and backward's to the node.
    assert step_traffic(toy_shape(), 4, 2, 2, qwz=True).network == math.ceil(0.75 * 2 * ((2410 + 1210) * 1 + 100 * 2))
    hpz = step_traffic(toy_shape(), 4, 2, 2, hpz=4)
    assert hpz == StepTraffic(math.ceil(0.75 * 2 * (100 + 100) * 2), math.ceil(0.75 * 2 * (2310 + 1210) * 2))
    # In groups of 2 (of 4 ranks) a node-local gather moves half of what it gathers, not 3/4.
    assert step_traffic(toy_shape(), 4, 2, 2, hpz=2).node_local == math.ceil(0.5 * 2 * (2310 + 1210) * 2)
    # A tied head is the embedding: backward gathers it; one importance probe batch per 2 steps adds half a pass.
    assert step_traffic(toy_shape(tied=True), 4, 1, 2).network == math.ceil(0.75 * (1410 + 1210 + 100) * 2)
    assert step_traffic(toy_shape(), 4, 2, 2, importance_passes=0.5).network == math.ceil(0.75 * 2.5 * (2410 + 1210 + 100) * 2)
    # Validation forwards (one per 2 steps) gather forward's weights alone: no backward, no gradients.
    assert step_traffic(toy_shape(), 4, 2, 2, validation_passes=0.5).network == math.ceil(0.75 * (2 * (2410 + 1210 + 100) + 0.5 * 2410) * 2)
    assert step_traffic(toy_shape(), 4, 2, 2, hpz=4, validation_passes=1).node_local == math.ceil(0.75 * (2 * (2310 + 1210) + 2310) * 2)
    assert step_traffic(toy_shape(), 1, 2, 2) == StepTraffic(0, 0)


@pytest.mark.e2e
def test_the_gathers_are_what_zero3_gathered_on_the_demo_model(tmp_path):
    """benchmarks/RESULTS.md, issue 16: AllGatherCounter on 2 CPU ranks, ADEPT with copies after layers 12, 14, 16
    and 17 of the demo model, fp32, one micro-batch: 1005.2 MB sharded with the ~3-layer window, 594.7 MB with the
    wide one (the whole model is under its 1e9 live elements), 56.6 MB replicated (the copies, kept for backward)."""
    from adept_ds.model.checkpoint import open_checkpoint
    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.model.expand import plan_expansion
    from adept_ds.run.config import load_run_config
    from adept_ds.run.plan import model_shape

    config = open_checkpoint(fetch_demo_model()).config
    layers = config["num_hidden_layers"]
    copies = [index for index, (_, copy) in enumerate(plan_expansion(layers, [12, 14, 16, 17]).layer_sources()) if copy]
    model = tmp_path
    (model / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=layers + 4)))
    (model / "adept_expansion.json").write_text(json.dumps({"copied_layers": copies, "num_layers": layers + 4}))
    shape = model_shape(load_run_config(None, [f"model={model}", "method=adept"]))
    measured = {("sharded", 0): 1005.2, ("sharded", 10**9): 594.7, ("replicated", 10**9): 56.6}
    for (layout, live), megabytes in measured.items():
        assert micro_batch_gathers(shape, 4, layout, live).network / 1e6 == pytest.approx(megabytes, abs=0.15), layout


def test_step_time_is_compute_at_the_mfu_plus_traffic_at_its_bandwidth():
    flops = StepFlops(train=8e15, importance=1e15, validation=1e15, six_n=12e15)
    traffic = StepTraffic(network=50 * 10**9, node_local=10 * 10**9)
    # 16 GPUs on 2 nodes: 1e16 FLOP / (16 x 1000 TFLOP/s x 0.5) = 1.25 s; 50 GB at 400 Gb/s = 1 s; 10 GB on NVLink.
    timed = step_time(flops, traffic, 16, 1000.0, 0.5, 400.0, gpu=True, nodes=2)
    assert timed.compute_s == pytest.approx(1.25) and timed.communication_s == pytest.approx(1 + 80 / NVLINK_GBPS)
    assert timed.seconds == pytest.approx(timed.compute_s + timed.communication_s)
    # One GPU node: all on NVLink. CPU: all at the given (gloo) bandwidth.
    assert step_time(flops, traffic, 16, 1000.0, 0.5, 400.0, gpu=True, nodes=1).communication_s == pytest.approx(480 / NVLINK_GBPS)
    assert step_time(flops, traffic, 16, 1000.0, 0.5, 400.0, gpu=False, nodes=1).communication_s == pytest.approx(1.2)


def test_plan_tokens_adds_step_time_time_to_train_and_gpu_hours():
    args = ["--config", str(RUN), "--nodes", "2", "--gpus-per-node", "8", "--k", "8", "--tokens", "50000000000"]
    done = plan_cli(*args, "--json")
    assert done.returncode in (0, 3), done.stderr
    timing = json.loads(done.stdout)["time"]
    assert timing["tokens_per_step"] == 1 * 8 * 16 * 4096  # micro 1 x accumulation 8 x 16 ranks x 4096 tokens
    assert timing["steps"] == math.ceil(50_000_000_000 / timing["tokens_per_step"])
    assert timing["hours"] == pytest.approx(timing["steps"] * timing["step_s"] / 3600)
    assert timing["gpu_hours"] == pytest.approx(16 * timing["hours"])
    assert timing["mfu"] == 0.35 and timing["peak_tflops"] == 989.4 and timing["network_gbps"] == 400.0
    assert timing["step_tflop"] < timing["step_tflop_6n"]  # a frozen backbone computes less than 6N
    text = plan_cli(*args, "--mfu", "0.5", "--network-gbps", "200")
    assert "time: " in text.stdout and "MFU 50%" in text.stdout and "at 200 Gb/s" in text.stdout and "GPU-hours" in text.stdout


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tokens", "0"], "--tokens 0: need the training tokens"),
        (["--tokens", "100", "--mfu", "1.5"], "--mfu 1.5: need a fraction of the peak in (0, 1]"),
        (["--tokens", "100", "--mfu", "0"], "--mfu 0.0: need a fraction of the peak in (0, 1]"),
        (["--tokens", "100", "--network-gbps", "-1"], "--network-gbps -1.0: need a positive bandwidth"),
        (["--tokens", "100", "--peak-tflops", "0"], "--peak-tflops 0.0: need a positive dense peak"),
        (["--mfu", "0.4"], "--mfu, --network-gbps and --peak-tflops time a run: give --tokens too"),
        (["--tokens", "100", "--device", "cpu"], "--device cpu --tokens: give --network-gbps, gloo's all-gather rate"),
    ],
)
def test_plan_refuses_nonsense_time_options_in_one_line(extra, message):
    done = plan_cli("--config", str(RUN), "--k", "8", f"model={SHAPES / 'llama-3-8b'}", *extra)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
