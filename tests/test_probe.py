import copy
import json

import pytest
import torch
from corpora import sentences, write_jsonl
from model_checks import load_state
from PIL import Image
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from adept_ds.cli import main as cli_main
from adept_ds.model.expand import read_manifest
from adept_ds.model.families import family_of
from adept_ds.probe.layers import (
    PROBE_FORMAT,
    loss_sum,
    plain_runtime,
    probe_dtype,
    probe_model,
    probe_scores,
    read_probe_result,
    shard_batches,
)
from adept_ds.probe.mask import bypass_layer, default_chunk_layers, mask_loss_sums, naive_mask_loss_sums


def mean_loss(model, batches):
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += loss_sum(model(input_ids=batch, use_cache=False).logits[:, :-1], batch[:, 1:]).item()
            count += batch[:, 1:].numel()
    return total / count


def without_layer(model, index):
    """A copy of the model with decoder layer `index` physically deleted."""
    pruned = copy.deepcopy(model)
    layers = pruned.model.layers
    del layers[index]
    pruned.config.num_hidden_layers -= 1
    if getattr(pruned.config, "layer_types", None):
        del pruned.config.layer_types[index]
    for new_index, layer in enumerate(layers):
        layer.self_attn.layer_idx = new_index
    return pruned


def blocks(seed=0, count=6, length=24):
    return torch.randint(3, 259, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["llama", "qwen2", "qwen3", "mistral"])
def tiny_model(request, tmp_path):
    directory = make_tiny_model(tmp_path / request.param, request.param, num_layers=4)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_mask_score_equals_physically_deleting_the_layer(tiny_model):
    family = family_of(tiny_model)
    data = blocks()
    batches = [(data[:4], 1.0), (data[4:], 1.0)]
    total = data[:, 1:].numel()
    scores, base, _ = probe_scores(family, plain_runtime(tiny_model, family, False), batches, "mask", total, False)
    assert base == pytest.approx(mean_loss(tiny_model, [data[:4], data[4:]]), abs=1e-6)
    for index in range(4):
        deleted = mean_loss(without_layer(tiny_model, index), [data[:4], data[4:]])
        assert scores[index] == pytest.approx(deleted - base, abs=1e-4)
    assert len({round(s, 6) for s in scores}) == 4  # the layers really differ


def test_reuse_computes_exactly_what_the_naive_way_does(tiny_model):
    family = family_of(tiny_model)
    data = blocks(seed=1)
    naive = naive_mask_loss_sums(family, tiny_model, data)
    for chunk_layers in (None, 3):  # 3 of 4: the second chunk restarts the base pass from a recorded input
        assert torch.allclose(mask_loss_sums(family, tiny_model, data, chunk_layers)[0], naive, rtol=1e-6, atol=0)


def test_chunked_and_offloaded_mask_sums_equal_the_whole_ones_in_a_fraction_of_the_memory(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, "llama", num_layers=5), dtype=torch.float32).eval()
    family = family_of(model)
    data = blocks(seed=4, count=3)
    whole, whole_peak = mask_loss_sums(family, model, data)
    layer_input_bytes = data.numel() * model.config.hidden_size * 4  # one fp32 layer input, B x T x H
    assert whole_peak == 5 * layer_input_bytes
    assert torch.allclose(whole, naive_mask_loss_sums(family, model, data), rtol=1e-6, atol=0)
    for chunk_layers, offload in [(1, False), (3, False), (5, False), (2, True), (9, True)]:
        sums, peak = mask_loss_sums(family, model, data, chunk_layers, offload)
        assert torch.allclose(sums, whole, rtol=1e-6, atol=0), (chunk_layers, offload)
        assert peak == min(chunk_layers, 5) * layer_input_bytes  # C/L of the whole
    # The default chunk size keeps a byte budget: a 70B model in bf16 at 4 x 4096 tokens gets 8 of 80 layers.
    assert default_chunk_layers(80, 4 * 4096 * 8192 * 2) == 8
    assert default_chunk_layers(32, 4 * 256 * 4096 * 2) == 32 and default_chunk_layers(4, 10 << 30) == 1


def test_probe_dtype_is_the_models_on_gpu_and_fp32_on_cpu():
    assert probe_dtype("auto", {"torch_dtype": "bfloat16"}, cpu=False) == torch.bfloat16
    assert probe_dtype("auto", {"dtype": "float16"}, cpu=False) == torch.bfloat16  # fp16's range is too narrow for gradients
    assert probe_dtype("auto", {"dtype": "float32"}, cpu=False) == probe_dtype("auto", {}, cpu=False) == torch.float32
    assert probe_dtype("auto", {"dtype": "bfloat16"}, cpu=True) == torch.float32
    assert probe_dtype("bfloat16", {"dtype": "float32"}, cpu=True) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown probe dtype 'float16': choose one of auto, float32, bfloat16"):
        probe_dtype("float16", {}, cpu=False)


def test_bypass_is_a_hook_that_leaves_the_model_untouched(tiny_model):
    family = family_of(tiny_model)
    data = blocks(seed=2)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        before = tiny_model(input_ids=data).logits
        with bypass_layer(family, tiny_model, 1):
            bypassed = tiny_model(input_ids=data).logits
        after = tiny_model(input_ids=data).logits
    assert not torch.equal(before, bypassed)
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in tiny_model.state_dict().items())
    assert not any(layer._forward_hooks for layer in family.decoder_layers(tiny_model))


@pytest.mark.parametrize("method", ["grad", "fisher"])
def test_gradient_scores_match_a_direct_computation(tiny_model, method):
    family = family_of(tiny_model)
    data = blocks(seed=3)
    reference = copy.deepcopy(tiny_model)
    loss = loss_sum(reference(input_ids=data).logits[:, :-1], data[:, 1:]) / data[:, 1:].numel()
    loss.backward()
    expected = []
    for layer in reference.model.layers:
        terms = [(p * p.grad).abs().sum() if method == "grad" else (p.grad**2).sum() for p in layer.parameters()]
        expected.append(torch.stack(terms).sum().item())

    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    # Uneven batches, accumulated: the score must still be that of the mean loss over all tokens.
    batches = [(data[:1], 1.0), (data[1:4], 1.0), (data[4:], 1.0)]
    scores, base, _ = probe_scores(family, plain_runtime(tiny_model, family, True), batches, method, data[:, 1:].numel(), False)
    assert scores == pytest.approx(expected, rel=1e-5)
    assert base == pytest.approx(loss.item(), rel=1e-6)
    assert all(torch.equal(state[k], v) for k, v in tiny_model.state_dict().items())


def test_shard_batches_pads_every_rank_to_the_same_count():
    data = torch.arange(7).unsqueeze(1)
    rank0 = shard_batches(data, 0, 2, batch_size=3)
    rank1 = shard_batches(data, 1, 2, batch_size=3)
    assert [b.flatten().tolist() for b, _ in rank0] == [[0, 2, 4], [6]]
    assert [b.flatten().tolist() for b, _ in rank1] == [[1, 3, 5], [0]]
    assert [w for _, w in rank1] == [1.0, 0.0]


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "general.jsonl", sentences(200))


@pytest.fixture
def model_dir(tmp_path):
    return make_tiny_model(tmp_path / "model", "qwen3", num_layers=5)


def test_cli_probe_end_to_end_and_expand_consumes_it(tmp_path, corpus, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("ADEPT_DS_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "probe" / "result.json"
    args = ["--model", model_dir, "--data", corpus, "--output", output, "--max-tokens", 2048, "--block-size", 64]
    assert cli_main(["probe", *map(str, args)]) == 0
    printed = capsys.readouterr().out
    assert "least important layers" in printed
    assert "mask probe: recorded activations peak 0.00 GiB per rank (chunks of 5 layers)" in printed
    result = read_probe_result(output)
    assert result["format"] == PROBE_FORMAT and result["method"] == "mask"
    assert result["num_layers"] == 5 and len(result["scores"]) == 5
    assert result["num_blocks"] == 32 and result["num_tokens"] == 2048
    assert sorted(result["least_important"]) == list(range(5))
    assert result["least_important"][0] == min(range(5), key=lambda layer: result["scores"][layer])
    assert {"base_loss", "model_fingerprint", "data_fingerprint", "model", "data"} <= set(result)
    assert result["dtype"] == "float32" and result["mask_chunk_layers"] == 5
    assert result["recorded_activation_peak_bytes"] == 5 * 4 * 64 * 32 * 4  # 5 layer inputs of 4 blocks x 64 tokens x 32 fp32
    with Image.open(output.with_suffix(".png")) as chart:
        assert chart.size[0] > 100 and chart.size[1] > 100
    # Deterministic: a second run (from the Arrow cache), in chunks of 2 layers held in CPU memory, gives the same scores.
    again = [
        "--output",
        tmp_path / "again.json",
        "--max-tokens",
        2048,
        "--block-size",
        64,
        "--mask-chunk-layers",
        2,
        "--offload-activations",
    ]
    assert cli_main(["probe", *map(str, args[:-4] + again)]) == 0
    assert "peak 0.00 GiB per rank in CPU memory (chunks of 2 layers)" in capsys.readouterr().out
    rerun = read_probe_result(tmp_path / "again.json")
    assert rerun["scores"] == pytest.approx(result["scores"], rel=1e-6, abs=0)
    assert rerun["recorded_activation_peak_bytes"] == result["recorded_activation_peak_bytes"] * 2 // 5

    expanded = tmp_path / "expanded"
    assert cli_main(["expand", "--model", str(model_dir), "--output", str(expanded), "--probe", str(output), "--k", "2"]) == 0
    assert read_manifest(expanded)["expanded_layers"] == sorted(result["least_important"][:2])


def test_probe_methods_write_results(tmp_path, corpus, model_dir, monkeypatch):
    monkeypatch.setenv("ADEPT_DS_CACHE", str(tmp_path / "cache"))
    before = load_state(model_dir)
    for method, dtype in (("grad", "auto"), ("fisher", "bfloat16")):
        output = tmp_path / f"{method}.json"
        result = probe_model(model_dir, corpus, output, method=method, max_tokens=1024, block_size=64, show_progress=False, dtype=dtype)
        assert all(score > 0 for score in result["scores"])
        assert json.loads(output.read_text())["method"] == method
        assert result["dtype"] == {"auto": "float32", "bfloat16": "bfloat16"}[dtype]  # auto: fp32 on CPU
    assert all(torch.equal(before[k], v) for k, v in load_state(model_dir).items())


def test_a_seeded_probe_draws_its_blocks_from_the_whole_corpus(tmp_path, corpus, model_dir, monkeypatch):
    """Studies over seeds vary the probe batches: the same seed, the same scores; another seed, other blocks."""
    monkeypatch.setenv("ADEPT_DS_CACHE", str(tmp_path / "cache"))

    def probe(name, seed):
        return probe_model(model_dir, corpus, tmp_path / name, max_tokens=512, block_size=64, show_progress=False, seed=seed)

    first, again, other, plain = probe("a.json", 1), probe("b.json", 1), probe("c.json", 2), probe("d.json", None)
    assert first["scores"] == again["scores"] and first["seed"] == 1 and first["num_blocks"] == 8
    assert other["scores"] != first["scores"] and plain["scores"] not in (first["scores"], other["scores"])


@pytest.mark.parametrize(
    "setup,kwargs,message",
    [
        ("empty", {}, r"corpus file .*empty.jsonl is empty"),
        ("no_text", {}, r"has no text field 'text' \(fields: \['body', 'id'\]\); set the text field name"),
        ("ok", {"method": "saliency"}, r"unknown probe method 'saliency': choose one of mask, grad, fisher"),
        ("ok", {"max_tokens": 32, "block_size": 64}, r"token budget --max-tokens 32 is smaller than one block of 64 tokens"),
        ("tiny", {"block_size": 4096}, r"corpus .*tiny.jsonl has \d+ tokens, fewer than one block of 4096"),
        ("missing", {}, r"probe corpus .*nothing.jsonl does not exist"),
        ("ok", {"mask_chunk_layers": 0}, r"--mask-chunk-layers 0 must be at least 1"),
        ("ok", {"dtype": "float16"}, r"unknown probe dtype 'float16': choose one of auto, float32, bfloat16"),
    ],
)
def test_probe_bad_inputs(tmp_path, model_dir, monkeypatch, setup, kwargs, message):
    monkeypatch.setenv("ADEPT_DS_CACHE", str(tmp_path / "cache"))
    data = {
        "empty": lambda: (tmp_path / "empty.jsonl").write_text("") or tmp_path / "empty.jsonl",
        "no_text": lambda: write_jsonl(tmp_path / "other.jsonl", sentences(5), field="body"),
        "ok": lambda: write_jsonl(tmp_path / "ok.jsonl", sentences(50)),
        "tiny": lambda: write_jsonl(tmp_path / "tiny.jsonl", sentences(2)),
        "missing": lambda: tmp_path / "nothing.jsonl",
    }[setup]()
    output = tmp_path / "result.json"
    with pytest.raises(ValueError, match=message):
        probe_model(model_dir, data, output, show_progress=False, **kwargs)
    assert not output.exists()
