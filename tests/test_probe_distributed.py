import pytest
import torch
from corpora import sentences, write_jsonl
from distributed import REPO_DIR, read_rank_results, run_deepspeed
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from adept_ds.families import family_of
from adept_ds.probe import plain_runtime, probe_model, probe_scores, read_probe_result, shard_batches

pytestmark = pytest.mark.dist


def test_grad_and_fisher_on_two_zero3_ranks_match_one_process(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", "llama", num_layers=4)
    blocks = torch.randint(3, 259, (7, 32), generator=torch.Generator().manual_seed(0))  # 7: uneven over 2 ranks
    torch.save(blocks, tmp_path / "blocks.pt")
    run_deepspeed("probe_zero3.py", model_dir, tmp_path / "blocks.pt", tmp_path, timeout=600)
    results = read_rank_results(tmp_path, world_size=2)
    assert all(r["partitioned"] and r["weights_unchanged"] for r in results)
    assert results[0]["scores"] == results[1]["scores"]

    for method in ("grad", "fisher"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        family = family_of(model)
        batches = shard_batches(blocks, 0, 1, batch_size=2)
        expected, base = probe_scores(family, plain_runtime(model, family, True), batches, method, blocks[:, 1:].numel(), False)
        assert results[0]["scores"][method] == pytest.approx(expected, rel=1e-5)
        assert results[0]["base_loss"][method] == pytest.approx(base, rel=1e-6)


def test_mask_probe_cli_under_deepspeed_matches_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("ADEPT_DS_CACHE", str(tmp_path / "cache"))
    model_dir = make_tiny_model(tmp_path / "model", "qwen2", num_layers=4)
    corpus = write_jsonl(tmp_path / "general.jsonl", sentences(120))
    options = ["--model", model_dir, "--data", corpus, "--max-tokens", 1600, "--block-size", 64, "--batch-size", 2]
    run_deepspeed(REPO_DIR / "launch" / "probe.py", *options, "--output", tmp_path / "two.json", ADEPT_DS_CACHE=str(tmp_path / "cache"))
    two_ranks = read_probe_result(tmp_path / "two.json")
    assert two_ranks["world_size"] == 2 and two_ranks["num_blocks"] == 25  # 25 blocks: uneven over 2 ranks
    assert (tmp_path / "two.png").is_file()

    one = probe_model(model_dir, corpus, tmp_path / "one.json", max_tokens=1600, block_size=64, batch_size=2, show_progress=False)
    assert one["world_size"] == 1
    assert two_ranks["scores"] == pytest.approx(one["scores"], rel=1e-5)
    assert two_ranks["base_loss"] == pytest.approx(one["base_loss"], rel=1e-6)
    assert two_ranks["least_important"] == one["least_important"]
    assert two_ranks["model_fingerprint"] == one["model_fingerprint"]
