"""Evaluation: token-weighted mean next-token loss (and perplexity) of a model on a corpus."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from adept_ds.probe import loss_sum


def corpus_loss(model, blocks: torch.Tensor, batch_size: int = 4, show_progress: bool = False) -> float:
    """Mean next-token cross-entropy over all predicted tokens of `blocks` [N, T]."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(blocks), batch_size), desc="eval", disable=not show_progress):
            batch = blocks[start : start + batch_size]
            total += loss_sum(model(input_ids=batch, use_cache=False).logits[:, :-1], batch[:, 1:]).item()
            count += batch[:, 1:].numel()
    return total / count


def evaluate_losses(model_dir: str | Path, corpora: dict[str, str | Path], block_size: int, max_blocks: int, cache_dir: str | Path) -> dict:
    """{name: {"loss", "perplexity", "tokens"}} for each corpus, on at most `max_blocks` blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adept_ds.data import load_blocks

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = {}
    for name, path in corpora.items():
        blocks = load_blocks(path, tokenizer, block_size, cache_dir)[:max_blocks]["input_ids"]
        loss = corpus_loss(model, blocks)
        results[name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(blocks.numel())}
    return results
