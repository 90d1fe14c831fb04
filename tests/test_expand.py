import json
import re
from pathlib import Path

import pytest
import torch
from model_checks import assert_function_preserved, load_state
from tiny_models import make_tiny_model
from transformers import AutoTokenizer

from adept_ds.cli import main as cli_main
from adept_ds.model import expand as expand_module
from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
from adept_ds.model.expand import MANIFEST_NAME, expand_checkpoint, plan_expansion, read_manifest
from adept_ds.probe.layers import PROBE_FORMAT


def assert_no_leftovers(parent: Path, output: Path) -> None:
    assert not output.exists()
    assert not [p for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


CASES = [
    ("llama", False, None),
    ("llama", True, "20KB"),
    ("mistral", False, "20KB"),
    ("qwen2", True, None),
    ("qwen3", False, "20KB"),
    ("qwen3", True, None),
]


@pytest.mark.parametrize(
    "family,tie,shard", CASES, ids=[f"{f}-{'tied' if t else 'untied'}-{'sharded' if s else 'single'}" for f, t, s in CASES]
)
def test_expansion_preserves_function_and_copies_layers(tmp_path, family, tie, shard):
    original = make_tiny_model(tmp_path / "orig", family, num_layers=5, tie=tie, max_shard_size=shard)
    output = tmp_path / "expanded"
    layers = [3, 0]
    manifest = expand_checkpoint(original, output, layers, show_progress=False)

    assert_function_preserved(original, output, vocab_size=260)

    # Manifest: layer order 0, 0', 1, 2, 3, 3', 4.
    assert manifest == read_manifest(output)
    assert manifest["num_original_layers"] == 5 and manifest["num_layers"] == 7
    assert manifest["expanded_layers"] == [0, 3]
    assert manifest["copied_layers"] == [1, 5]
    assert [(e["source"], e["trainable_copy"]) for e in manifest["layers"]] == [
        (0, False),
        (0, True),
        (1, False),
        (2, False),
        (3, False),
        (3, True),
        (4, False),
    ]
    assert manifest["family"] == family
    assert manifest["source_fingerprint"] == fingerprint_checkpoint(open_checkpoint(original))

    config = json.loads((output / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    if family in ("qwen2", "qwen3"):
        assert len(config["layer_types"]) == 7
    assert config["tie_word_embeddings"] == tie

    before, after = load_state(original), load_state(output)
    assert ("lm_head.weight" in after) == (not tie)
    prefix = "model.layers."
    for name, tensor in before.items():
        if not name.startswith(prefix):
            assert torch.equal(after[name], tensor)
            continue
        layer, local = name[len(prefix) :].split(".", 1)
        entry_new = {e["source"]: e["index"] for e in manifest["layers"] if not e["trainable_copy"]}
        assert torch.equal(after[f"{prefix}{entry_new[int(layer)]}.{local}"], tensor)
        if int(layer) in layers:
            copy = after[f"{prefix}{entry_new[int(layer)] + 1}.{local}"]
            if local.startswith(("self_attn.o_proj", "mlp.down_proj")):
                assert copy.abs().sum() == 0 and copy.shape == tensor.shape
            else:
                assert torch.equal(copy, tensor)
    assert len(after) == len(before) + 2 * (len([n for n in before if n.startswith(prefix + "0.")]))

    if shard:
        index = json.loads((output / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(after)
        assert len(set(index["weight_map"].values())) > 1
        assert all((output / shard_file).is_file() for shard_file in index["weight_map"].values())

    # Tokenizer and generation config travel with the weights.
    assert AutoTokenizer.from_pretrained(output)("abc")["input_ids"] == AutoTokenizer.from_pretrained(original)("abc")["input_ids"]
    assert (output / "generation_config.json").read_text() == (original / "generation_config.json").read_text()


def test_biases_of_residual_outputs_are_zeroed_too(tmp_path):
    original = make_tiny_model(tmp_path / "orig", "llama", num_layers=3, attention_bias=True, mlp_bias=True)
    output = tmp_path / "expanded"
    expand_checkpoint(original, output, [1], show_progress=False)
    after = load_state(output)
    assert after["model.layers.1.self_attn.o_proj.bias"].abs().sum() > 0
    for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert after[f"model.layers.2.{name}"].abs().sum() == 0
    assert torch.equal(after["model.layers.2.self_attn.q_proj.bias"], after["model.layers.1.self_attn.q_proj.bias"])
    assert_function_preserved(original, output, vocab_size=260)


def test_plan_new_indices():
    plan = plan_expansion(6, [4, 1])
    assert plan.expanded_layers == (1, 4)
    assert [plan.new_index(layer) for layer in range(6)] == [0, 1, 3, 4, 5, 7]
    assert plan.num_layers == 8


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_model(tmp_path / "orig", "llama", num_layers=4)


@pytest.mark.parametrize(
    "layers,message",
    [
        ([4], r"layer indices \[4\] are out of range: the model has 4 layers \(0..3\)"),
        ([-1], r"layer indices \[-1\] are out of range"),
        ([1, 2, 1], r"layer indices \[1\] are given more than once"),
        ([], r"no layers to expand"),
    ],
)
def test_bad_layer_selection(tmp_path, tiny, layers, message):
    with pytest.raises(ValueError, match=message):
        expand_checkpoint(tiny, tmp_path / "out", layers, show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        expand_checkpoint(tmp_path / "nope", tmp_path / "out", [0], show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        expand_checkpoint(empty, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_checkpoint_without_safetensors(tmp_path, tiny):
    (tiny / "model.safetensors").rename(tiny / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"neither model.safetensors .*pytorch_model.bin.*safe_serialization=True"):
        expand_checkpoint(tiny, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_truncated_safetensors_is_reported_as_corrupt(tmp_path, tiny):
    weights = tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable safetensors file .*model.safetensors"):
        expand_checkpoint(tiny, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_garbage_header_is_reported_as_corrupt(tmp_path, tiny):
    (tiny / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        expand_checkpoint(tiny, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_sharded_checkpoint_with_missing_shard(tmp_path):
    model = make_tiny_model(tmp_path / "orig", "llama", max_shard_size="20KB")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"names shard files that do not exist: \\['{shard.name}'\\]"):
        expand_checkpoint(model, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_config_with_fewer_layers_than_weights(tmp_path, tiny):
    config = json.loads((tiny / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config says 3 decoder layers but the weights hold layers \[0, 1, 2, 3\]"):
        expand_checkpoint(tiny, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_unsupported_family(tmp_path, tiny):
    config = json.loads((tiny / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model family 'gpt_neox'.*supports: llama, mistral, qwen2, qwen3"):
        expand_checkpoint(tiny, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_unknown_per_layer_config_list_is_refused(tmp_path, tiny):
    config = json.loads((tiny / "config.json").read_text())
    config["sliding_windows"] = [8, 8, 8, 8]
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'sliding_windows' looks per-layer"):
        expand_checkpoint(tiny, tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_expanding_an_expanded_model_is_refused(tmp_path, tiny):
    expand_checkpoint(tiny, tmp_path / "once", [0], show_progress=False)
    with pytest.raises(ValueError, match="already an expanded model"):
        expand_checkpoint(tmp_path / "once", tmp_path / "out", [0], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path, tiny):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=f"output directory {output} exists and is not empty; pass --overwrite"):
        expand_checkpoint(tiny, output, [0], show_progress=False)
    assert (output / "keep.txt").read_text() == "precious"
    expand_checkpoint(tiny, output, [0], overwrite=True, show_progress=False)
    assert not (output / "keep.txt").exists()
    assert read_manifest(output)["expanded_layers"] == [0]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


def test_empty_existing_output_is_fine(tmp_path, tiny):
    (tmp_path / "out").mkdir()
    expand_checkpoint(tiny, tmp_path / "out", [2], show_progress=False)
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()


def test_failure_mid_write_leaves_nothing_and_keeps_old_output(tmp_path, monkeypatch):
    model = make_tiny_model(tmp_path / "orig", "llama", max_shard_size="20KB")
    output = tmp_path / "out"
    expand_checkpoint(model, output, [0], show_progress=False)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real_save(tensors, path, metadata=metadata)

    real_save = expand_module.save_file
    monkeypatch.setattr(expand_module, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        expand_checkpoint(model, output, [1, 2], overwrite=True, show_progress=False)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]
    calls.clear()
    with pytest.raises(OSError):
        expand_checkpoint(model, tmp_path / "fresh", [1], show_progress=False)
    assert_no_leftovers(tmp_path, tmp_path / "fresh")


def write_probe(path: Path, scores, fingerprint, fmt=PROBE_FORMAT):
    path.write_text(
        json.dumps({"format": fmt, "method": "mask", "num_layers": len(scores), "scores": scores, "model_fingerprint": fingerprint})
    )
    return path


def test_cli_expand_from_probe(tmp_path, tiny, capsys):
    fingerprint = fingerprint_checkpoint(open_checkpoint(tiny))
    probe = write_probe(tmp_path / "probe.json", [0.5, 0.1, 0.9, 0.2], fingerprint)
    assert cli_main(["expand", "--model", str(tiny), "--output", str(tmp_path / "out"), "--probe", str(probe), "--k", "2"]) == 0
    assert read_manifest(tmp_path / "out")["expanded_layers"] == [1, 3]
    assert "4 -> 6 layers" in capsys.readouterr().out


def test_cli_expand_with_explicit_layers(tmp_path, tiny):
    assert cli_main(["expand", "--model", str(tiny), "--output", str(tmp_path / "out"), "--layers", "3,1"]) == 0
    assert read_manifest(tmp_path / "out")["copied_layers"] == [2, 5]


@pytest.mark.parametrize(
    "k,message", [(0, r"k=0 is out of range: choose between 1 and the number of layers \(4\)"), (5, r"k=5 is out of range")]
)
def test_cli_k_out_of_range(tmp_path, tiny, capsys, k, message):
    probe = write_probe(tmp_path / "probe.json", [0.5, 0.1, 0.9, 0.2], fingerprint_checkpoint(open_checkpoint(tiny)))
    code = cli_main(["expand", "--model", str(tiny), "--output", str(tmp_path / "out"), "--probe", str(probe), "--k", str(k)])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_cli_probe_from_another_model(tmp_path, tiny, capsys):
    probe = write_probe(tmp_path / "probe.json", [0.5, 0.1, 0.9, 0.2], "0123456789abcdef")
    code = cli_main(["expand", "--model", str(tiny), "--output", str(tmp_path / "out"), "--probe", str(probe), "--k", "1"])
    assert code == 2
    assert "measured on a different model (fingerprint 0123456789abcdef" in capsys.readouterr().err
    probe = write_probe(tmp_path / "probe.json", [0.5, 0.1, 0.9], None)
    assert cli_main(["expand", "--model", str(tiny), "--output", str(tmp_path / "out"), "--probe", str(probe), "--k", "1"]) == 2
    assert "scores 3 layers but the model has 4" in capsys.readouterr().err
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_cli_bad_probe_files(tmp_path, tiny, capsys):
    out = ["--model", str(tiny), "--output", str(tmp_path / "out")]
    assert cli_main(["expand", *out, "--probe", str(tmp_path / "missing.json"), "--k", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert cli_main(["expand", *out, "--probe", str(tmp_path / "bad.json"), "--k", "1"]) == 2
    assert "cannot read probe result file" in capsys.readouterr().err
    write_probe(tmp_path / "other.json", [1.0, 2.0, 3.0, 4.0], None, fmt="something-else")
    assert cli_main(["expand", *out, "--probe", str(tmp_path / "other.json"), "--k", "1"]) == 2
    assert "is not an adept_ds probe result" in capsys.readouterr().err
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_cli_argument_errors(tmp_path, tiny, capsys):
    out = ["--model", str(tiny), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        cli_main(["expand", *out, "--probe", "p.json"])
    assert "--probe and --uniform need --k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["expand", *out, "--layers", "1,x"])
    assert "expected comma-separated layer indices like 3,7,11, got '1,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["expand", *out])
    assert "one of the arguments --layers --probe --uniform is required" in capsys.readouterr().err
    assert cli_main(["expand", *out, "--layers", "9"]) == 2
    assert "out of range: the model has 4 layers" in capsys.readouterr().err
    assert_no_leftovers(tmp_path, tmp_path / "out")


def test_uniform_placement_is_llama_pros(tmp_path, tiny):
    from adept_ds.model.expand import uniform_layers

    assert uniform_layers(30, 4) == [6, 14, 21, 29]
    assert uniform_layers(4, 2) == [1, 3] and uniform_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k=5 is out of range"):
        uniform_layers(4, 5)
    assert cli_main(["expand", "--model", str(tiny), "--output", str(tmp_path / "out"), "--uniform", "--k", "2"]) == 0
    assert read_manifest(tmp_path / "out")["expanded_layers"] == [1, 3]
