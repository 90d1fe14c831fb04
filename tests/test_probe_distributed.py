import pytest
import torch
from cluster import run_launched
from corpora import sentences, write_jsonl
from distributed import REPO_DIR, read_rank_results, run_deepspeed
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from adept_ds.model.families import family_of
from adept_ds.probe.layers import probe_model, probe_scores, read_probe_result, shard_batches
from adept_ds.probe.runtime import plain_runtime

pytestmark = pytest.mark.dist


def test_grad_fisher_and_bf16_mask_on_two_zero3_ranks_match_one_process(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", "llama", num_layers=4)
    blocks = torch.randint(3, 259, (7, 32), generator=torch.Generator().manual_seed(0))  # 7: uneven over 2 ranks
    torch.save(blocks, tmp_path / "blocks.pt")
    run_deepspeed("probe_zero3.py", model_dir, tmp_path / "blocks.pt", tmp_path, timeout=600)
    results = read_rank_results(tmp_path, world_size=2)
    assert all(r["partitioned"] and r["weights_unchanged"] for r in results)
    assert results[0]["scores"] == results[1]["scores"]
    assert results[0]["dtype"] == {
        "grad": ["torch.float32"],
        "fisher": ["torch.float32"],
        "mask": ["torch.bfloat16"],
        "grad_bf16": ["torch.bfloat16"],
    }
    # Gradients summed over micro-batches and ranks in fp32 also for a bf16 model (DeepSpeed's default: the model's dtype).
    assert all(r["grad_accum_dtype"] == dict.fromkeys(("grad", "fisher", "grad_bf16"), "torch.float32") for r in results)

    batches = shard_batches(blocks, 0, 1, batch_size=2)
    for method in ("grad", "fisher"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        family = family_of(model)
        expected, base, _ = probe_scores(family, plain_runtime(model, family, True), batches, method, blocks[:, 1:].numel(), False)
        assert results[0]["scores"][method] == pytest.approx(expected, rel=1e-5)
        assert results[0]["base_loss"][method] == pytest.approx(base, rel=1e-6)
        if method == "grad":  # bf16 weights and activations, fp32 sums: within bf16's rounding of the fp32 scores
            assert results[0]["scores"]["grad_bf16"] == pytest.approx(expected, rel=0.1)
    # The ZeRO-3 mask probe in bf16, in chunks of 3 of the 4 layers, against one process in bf16.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    expected, base, _ = probe_scores(family, plain_runtime(model, family, False), batches, "mask", blocks[:, 1:].numel(), False)
    # Equal on this machine; the tolerance allows bf16 kernels whose rounding depends on the batch's other rows.
    assert results[0]["scores"]["mask"] == pytest.approx(expected, rel=1e-3)
    assert results[0]["base_loss"]["mask"] == pytest.approx(base, rel=1e-4)


def test_mask_probe_cli_under_deepspeed_matches_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("ADEPT_DS_CACHE", str(tmp_path / "cache"))
    model_dir = make_tiny_model(tmp_path / "model", "qwen2", num_layers=4)
    corpus = write_jsonl(tmp_path / "general.jsonl", sentences(120))
    options = ["--model", model_dir, "--data", corpus, "--max-tokens", 1600, "--block-size", 64, "--batch-size", 2]
    # In chunks of 3 of the 4 layers, held in CPU memory: the same scores as all layers at once in one process.
    chunked = ["--mask-chunk-layers", 3, "--offload-activations", "--output", tmp_path / "two.json"]
    # README: `deepspeed launch/probe.py ...`, through DeepSpeed's real launcher, which appends --local_rank=N.
    launched = run_launched("deepspeed", [REPO_DIR / "launch" / "probe.py", *options, *chunked], ADEPT_DS_CACHE=str(tmp_path / "cache"))
    two_ranks = read_probe_result(tmp_path / "two.json")
    assert two_ranks["world_size"] == 2 and two_ranks["num_blocks"] == 25  # 25 blocks: uneven over 2 ranks
    assert (tmp_path / "two.png").is_file()
    assert two_ranks["recorded_activation_peak_bytes"] == 3 * 2 * 64 * 32 * 4  # 3 fp32 inputs of 2 blocks x 64 tokens x 32
    assert launched.stdout.count("mask probe: recorded activations peak 0.00 GiB per rank in CPU memory (chunks of 3 layers)") == 1

    one = probe_model(model_dir, corpus, tmp_path / "one.json", max_tokens=1600, block_size=64, batch_size=2, show_progress=False)
    assert one["world_size"] == 1 and one["mask_chunk_layers"] == 4
    assert two_ranks["scores"] == pytest.approx(one["scores"], rel=1e-5)
    assert two_ranks["base_loss"] == pytest.approx(one["base_loss"], rel=1e-6)
    assert two_ranks["least_important"] == one["least_important"]
    assert two_ranks["model_fingerprint"] == one["model_fingerprint"]
