"""Exact comparisons shared by tests: checkpoints on disk, logits, greedy generation."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded."""
    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def load_fp32(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def assert_function_preserved(original: Path, expanded: Path, vocab_size: int, seed: int = 0) -> None:
    """Loaded with plain transformers: fp32 logits bit-identical (max |diff| == 0), greedy generation identical."""
    before, after = load_fp32(original), load_fp32(expanded)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(3, vocab_size, (3, 17), generator=generator)
    with torch.no_grad():
        diff = (before(inputs).logits - after(inputs).logits).abs().max().item()
        assert diff == 0.0
        prompt = inputs[:1, :5]
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(before.generate(prompt, **kwargs), after.generate(prompt, **kwargs))
