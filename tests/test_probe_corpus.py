import json

import pytest
import torch
from cluster import run_launched
from tiny_models import make_tiny_model
from transformers import AutoTokenizer

from adept_ds.cli import main as cli_main
from adept_ds.data.blocks import load_blocks
from adept_ds.data.self_replay import manifest_path
from adept_ds.probe.corpus import batch_seed, make_probe_corpus
from adept_ds.probe.layers import read_probe_result

# Small enough for a few generate calls of the tiny model: 4 documents of at most 24 tokens a batch.
SIZES = {"num_tokens": 150, "batch_size": 4, "max_new_tokens": 24, "show_progress": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("corpus") / "model", "llama", num_layers=3)


@pytest.fixture(scope="module")
def corpus(model_dir, tmp_path_factory):
    """One 1-thread run the tests share: the 2-rank test compares against it, at its ranks' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("corpus") / "general.jsonl"
        return path, make_probe_corpus(model_dir, path, seed=3, **SIZES)
    finally:
        torch.set_num_threads(threads)


def read_texts(path):
    """Every record's text, decoding the file's bytes as strict UTF-8."""
    return [json.loads(line)["text"] for line in path.read_bytes().decode("utf-8", errors="strict").splitlines()]


def test_records_are_non_empty_utf8_text_holding_the_tokens(corpus, model_dir):
    path, stats = corpus
    texts = read_texts(path)
    assert len(texts) == stats["documents"] > 1
    assert all(isinstance(text, str) and text.strip() for text in texts)
    # The random byte-level model writes invalid UTF-8 byte runs: they come out as U+FFFD, not as bad bytes.
    assert any("\ufffd" in text for text in texts) and any(not text.isascii() for text in texts)
    assert 150 <= stats["tokens"] < 150 + 24  # N reached; past it by less than one document
    assert stats["sampled_tokens"] >= stats["tokens"] and stats["start_token"] == "<s>"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert sum(len(tokenizer(text)["input_ids"]) for text in texts) >= 150 * 0.9  # decoded text re-tokenises to about N


def test_a_seed_gives_the_same_bytes_and_another_seed_other_text(corpus, model_dir, tmp_path):
    path, _ = corpus
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_probe_corpus(model_dir, tmp_path / "again.jsonl", seed=3, **SIZES)
        make_probe_corpus(model_dir, tmp_path / "other.jsonl", seed=4, **SIZES)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    assert read_texts(tmp_path / "other.jsonl")[0] != read_texts(path)[0]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len({batch_seed(seed, batch) for seed in range(3) for batch in range(100)}) == 300


def test_the_corpus_loads_as_a_probe_corpus(corpus, model_dir, tmp_path, monkeypatch, capsys):
    path, _ = corpus
    monkeypatch.setenv("ADEPT_DS_CACHE", str(tmp_path / "cache"))
    store = load_blocks(path, AutoTokenizer.from_pretrained(model_dir), 32, tmp_path / "cache" / "blocks")
    assert len(store) >= 4
    output = tmp_path / "probe.json"
    args = ["probe", "--model", str(model_dir), "--data", str(path), "--output", str(output), "--max-tokens", "128"]
    assert cli_main([*args, "--block-size", "32"]) == 0
    assert read_probe_result(output)["num_tokens"] == 128


def test_cli_prints_the_figures_and_refuses_bad_values(model_dir, tmp_path, capsys):
    output = tmp_path / "cli.jsonl"
    args = ["make-probe-corpus", "--model", str(model_dir), "--output", str(output), "--batch-size", "4", "--max-new-tokens", "8"]
    assert cli_main([*args, "--tokens", "20", "--temperature", "0.8", "--top-p", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {output}; sampled" in printed and "tokens/s on 1 rank(s), float32" in printed
    assert read_texts(output)
    for bad, message in [
        (["--tokens", "0"], "--tokens 0 is out of range: it must be >= 1"),
        (["--tokens", "5", "--top-p", "1.5"], "--top-p 1.5 is out of range: it must be in (0, 1]"),
        (["--tokens", "5", "--temperature", "0"], "--temperature 0.0 is out of range: it must be > 0"),
    ]:
        assert cli_main([*args, *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_two_ranks_write_what_one_rank_writes(corpus, model_dir, tmp_path, launcher):
    """README: `deepspeed --num_gpus N --module adept_ds.cli make-probe-corpus ...` (DeepSpeed passes --local_rank),
    and `mpirun -np N python -m adept_ds.cli make-probe-corpus ...`."""
    path, stats = corpus
    output = tmp_path / "two_ranks.jsonl"
    args = ["make-probe-corpus", "--model", model_dir, "--output", output, "--seed", 3, "--tokens", 150]
    result = run_launched(launcher, ["-m", "adept_ds.cli", *args, "--batch-size", 4, "--max-new-tokens", 24], timeout=300)
    assert output.read_bytes() == path.read_bytes()
    assert json.loads(manifest_path(output).read_text()) == json.loads(manifest_path(path).read_text())  # rank 0's, once
    assert "on 2 rank(s)" in result.stdout and f"{stats['tokens']:,} tokens in {stats['documents']:,} documents" in result.stdout
