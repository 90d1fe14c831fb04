"""`adept-ds merge`: alpha 0 and 1 give back the base and the trained model exactly, for a model trained whole and for
an expanded one, on sharded bf16 checkpoints; points between are the stated interpolation; its peak memory is bounded
like export's; bad input is refused in one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corpora import sentences, write_jsonl
from distributed import cpu_env
from model_checks import load_state
from test_export_memory import _rss_during
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from adept_ds.evaluation.evaluate import evaluate_model
from adept_ds.evaluation.merge_curve import merge_curve
from adept_ds.model.expand import MANIFEST_NAME, expand_checkpoint, read_manifest
from adept_ds.model.merge import merge_checkpoints

SHARD = "20KB"


def bf16_model(directory, **config):
    """A tiny random llama saved in bf16 in several shards."""
    original = make_tiny_model(directory.with_name(directory.name + "_fp32"), **config)
    AutoModelForCausalLM.from_pretrained(original, dtype="bfloat16").save_pretrained(directory, max_shard_size=SHARD)
    for item in original.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(item, directory / item.name)
    return directory


def trained_from(model_dir, directory, only=lambda name: True):
    """`model_dir` with the tensors `only` selects moved (as training would), saved in its sharding and dtype."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="bfloat16")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only(name):
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(directory, max_shard_size=SHARD)
    for item in model_dir.iterdir():  # the expansion manifest travels with the model, as export copies it
        if item.is_file() and item.suffix != ".safetensors" and not (directory / item.name).exists():
            shutil.copy2(item, directory / item.name)
    return directory


def logits(model_dir, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype="bfloat16")(ids).logits


def test_a_model_trained_whole_interpolates_every_tensor_and_its_endpoints_are_exact(tmp_path):
    base = bf16_model(tmp_path / "base")
    trained = trained_from(base, tmp_path / "trained")
    assert len(list(base.glob("*.safetensors"))) >= 3
    base_state, trained_state = load_state(base), load_state(trained)
    for alpha, expected in ((0.0, base_state), (1.0, trained_state)):
        merged = load_state(merge_checkpoints(base, trained, alpha, tmp_path / f"a{alpha}", show_progress=False))
        assert merged.keys() == expected.keys()
        for name, tensor in merged.items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name]), name
    half = load_state(merge_checkpoints(base, trained, 0.5, tmp_path / "half", show_progress=False))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(half[name], ((base_state[name].float() + trained_state[name].float()) / 2).to(torch.bfloat16))
    record = json.loads((tmp_path / "half" / "adept_merge.json").read_text())
    assert record["alpha"] == 0.5 and record["changed_tensors"] == "all"
    assert (tmp_path / "half" / "model.safetensors.index.json").is_file()  # the trained model's sharding


def test_an_expanded_model_scales_its_copies_residual_outputs(tmp_path):
    base = bf16_model(tmp_path / "base")
    expanded = tmp_path / "expanded"
    expand_checkpoint(base, expanded, [0, 2], show_progress=False)
    copies = [f"model.layers.{index}." for index in read_manifest(expanded)["copied_layers"]]
    trained = trained_from(expanded, tmp_path / "trained", only=lambda name: any(name.startswith(copy) for copy in copies))
    trained_state, ids = load_state(trained), torch.randint(0, 200, (2, 12))

    at_zero = merge_checkpoints(base, trained, 0.0, tmp_path / "zero", show_progress=False)
    assert torch.equal(logits(at_zero, ids), logits(base, ids))  # every copy adds exactly zero: the base's function
    assert not torch.equal(logits(trained, ids), logits(base, ids))
    at_one = load_state(merge_checkpoints(base, trained, 1.0, tmp_path / "one", show_progress=False))
    assert all(torch.equal(tensor, trained_state[name]) for name, tensor in at_one.items())

    quarter = load_state(merge_checkpoints(base, trained, 0.25, tmp_path / "quarter", show_progress=False))
    scaled = {name for name in trained_state if any(name.startswith(copy) for copy in copies) and ("o_proj" in name or "down_proj" in name)}
    assert len(scaled) == 2 * len(copies)
    for name, tensor in quarter.items():
        expected = (trained_state[name].float() * 0.25).to(torch.bfloat16) if name in scaled else trained_state[name]
        assert torch.equal(tensor, expected), name
    assert json.loads((tmp_path / "quarter" / "adept_merge.json").read_text())["changed_tensors"] == sorted(scaled)
    assert (tmp_path / "quarter" / MANIFEST_NAME).is_file()


def merge_cli(*args):
    """The `adept-ds merge` console script of this environment."""
    script = Path(sys.executable).parent / "adept-ds"
    return subprocess.run([str(script), "merge", *map(str, args)], capture_output=True, text=True, env=cpu_env())


def test_merge_refuses_bad_input_in_one_line(tmp_path):
    base = bf16_model(tmp_path / "base")
    other = bf16_model(tmp_path / "other", seed=3)
    expanded = tmp_path / "expanded"
    expand_checkpoint(base, expanded, [1], show_progress=False)
    wider = bf16_model(tmp_path / "wider", num_layers=5)
    cases = [
        (["--base", base, "--trained", base, "--alpha", "1.5"], "--alpha 1.5: need a weight in [0, 1]"),
        (["--base", other, "--trained", expanded, "--alpha", "0.5"], "give --base the model `adept-ds expand` read"),
        (["--base", base, "--trained", wider, "--alpha", "0.5"], "not trained from this base"),
    ]
    for args, message in cases:
        done = merge_cli(*args, "--output", tmp_path / "out")
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "out").exists()  # nothing half-written
    done = merge_cli("--base", base, "--trained", expanded, "--alpha", "0.5", "--output", tmp_path / "out")
    assert done.returncode == 0 and "alpha=0.5" in done.stdout, done.stderr


def test_merge_peak_memory_is_about_one_shard(tmp_path):
    """A ~190 MB bf16 model in ~20 MB shards, merged whole (the case that reads both models): the peak, after the
    imports, stays under three of its largest shards (the output shard being built and the two shards it reads,
    memory-mapped) plus the largest tensor at 10 bytes an element (base and trained in fp32, the bf16 result), plus
    16 MiB. Measured with plan_check.py's small mmap threshold, so that RSS follows live memory: at glibc's default
    the heap also keeps some freed blocks resident (113 MiB over the imports here, against 78 with the threshold)."""
    shape = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 2000}
    original = make_tiny_model(tmp_path / "fp32", num_layers=8, **shape)
    base, trained = tmp_path / "base", tmp_path / "trained"
    for directory, scale in ((base, 0.0), (trained, 0.5)):
        model = AutoModelForCausalLM.from_pretrained(original, dtype="bfloat16")
        with torch.no_grad():
            for param in model.parameters():
                param.add_(scale)
        model.save_pretrained(directory, max_shard_size="20MB")
    shards = list(base.glob("*.safetensors"))
    largest_shard, model_bytes = max(path.stat().st_size for path in shards), sum(path.stat().st_size for path in shards)
    largest_tensor = max(tensor.numel() for tensor in load_state(base).values())
    work = f"adept_ds.model.merge.merge_checkpoints('{base}', '{trained}', 0.5, '{tmp_path}/out', show_progress=False)"
    start, peak = _rss_during(work, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    bound = start + 3 * largest_shard + 10 * largest_tensor + 16 * 2**20
    mib = 2**20
    print(
        f"merge peak {(peak - start) / mib:.0f} MiB over the imports; bound {(bound - start) / mib:.0f}; the model {model_bytes / mib:.0f} MiB"
    )
    assert peak <= bound
    assert bound - start < 0.75 * model_bytes  # a bound that holding the whole model would break


@pytest.mark.parametrize("alpha", [-0.1, 2.0])
def test_alpha_outside_zero_one_is_refused_before_any_work(tmp_path, alpha):
    with pytest.raises(ValueError, match=r"need a weight in \[0, 1\]"):
        merge_checkpoints(tmp_path / "missing", tmp_path / "missing", alpha, tmp_path / "out")


def test_merge_alphas_evaluates_each_point_and_draws_the_curve(tmp_path):
    """`adept-ds merge --alphas`: the ends are the base and the trained model, each point is its merged model's
    evaluation against the base's, and a second call evaluates nothing again."""
    base = bf16_model(tmp_path / "base")
    trained = trained_from(base, tmp_path / "trained")
    corpora = {
        "general": write_jsonl(tmp_path / "general.jsonl", sentences(60)),
        "domain": write_jsonl(tmp_path / "domain.jsonl", sentences(60, seed=1)),
    }
    curve = tmp_path / "curve"
    args = ["--base", base, "--trained", trained, "--alphas", "0.5", "--output", curve, "--general", corpora["general"]]
    done = merge_cli(*args, "--domain", corpora["domain"], "--max-blocks", 4)
    assert done.returncode == 0, done.stderr
    points = json.loads((curve / "merge_curve.json").read_text())["points"]
    assert [entry["alpha"] for entry in points] == [0.0, 0.5, 1.0] and (curve / "merge_curve.png").stat().st_size > 0
    assert points[0]["general_increase"] == 0.0 and points[0]["domain_drop"] == 0.0

    def figures(model_dir):
        evaluated = evaluate_model(model_dir, corpora, max_blocks=4, cache_dir=tmp_path / "cache")
        return {name: evaluated["perplexity"][name]["perplexity"] for name in corpora}

    reference = figures(base)
    for entry, model_dir in ((points[1], curve / "alpha_0.5"), (points[2], trained)):
        measured = figures(model_dir)
        assert entry["general_increase"] == pytest.approx(measured["general"] - reference["general"], rel=1e-6)
        assert entry["domain_drop"] == pytest.approx(reference["domain"] - measured["domain"], rel=1e-6)
    assert "0.5 | " in done.stdout and "merge_curve.png" in done.stdout
    merged_at = (curve / "alpha_0.5" / "adept_merge.json").stat().st_mtime_ns
    again = merge_curve(base, trained, [0.5], curve, corpora, max_blocks=4)  # resumes: nothing merged or evaluated again
    assert again == points and (curve / "alpha_0.5" / "adept_merge.json").stat().st_mtime_ns == merged_at
    with pytest.raises(ValueError, match="the merge curve needs both held-out corpora: give --domain"):
        merge_curve(base, trained, [0.5], tmp_path / "other", {"general": corpora["general"]})
    with pytest.raises(ValueError, match="is the curve of other models"):
        merge_curve(base, base, [0.5], curve, corpora)
