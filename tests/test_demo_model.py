import json

import pytest
import torch
from model_checks import assert_function_preserved
from transformers import AutoModelForCausalLM, AutoTokenizer

from adept_ds.cli import main as cli_main
from adept_ds.model.demo_model import fetch_demo_model
from adept_ds.model.expand import read_manifest

pytestmark = pytest.mark.e2e


def test_demo_model_is_a_plain_working_llama(demo_model_dir):
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][inputs["input_ids"].shape[1] :])


def test_demo_model_is_built_once(demo_model_dir):
    weights = demo_model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert fetch_demo_model() == demo_model_dir
    assert weights.stat().st_mtime_ns == stamp


def test_expanded_demo_model_is_function_preserving(demo_model_dir, tmp_path):
    """The real 30-layer model, expanded by 4 through the CLI, named as `--model demo`."""
    output = tmp_path / "expanded"
    assert cli_main(["expand", "--model", "demo", "--output", str(output), "--layers", "3,11,20,29"]) == 0
    manifest = read_manifest(output)
    assert manifest["num_layers"] == 34 and manifest["copied_layers"] == [4, 13, 23, 33]
    assert manifest["source_model"] == str(demo_model_dir.absolute())
    assert_function_preserved(demo_model_dir, output, vocab_size=49152)
