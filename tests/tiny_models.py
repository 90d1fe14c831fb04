"""Tiny random-weight checkpoints of every supported family, built from configs (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 259 tokens (3 specials + 256 bytes): real, deterministic, offline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(family: str, num_layers: int = 4, tie: bool = False, **overrides):
    kwargs = dict(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return CONFIG_CLASSES[family](**kwargs)


def make_tiny_model(
    directory: Path,
    family: str = "llama",
    num_layers: int = 4,
    tie: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Save a tiny random model + byte tokenizer + generation config to `directory`.

    Every tensor (norms and biases included) is random, so a test that compares copies with their
    sources cannot pass by accident on all-ones norms or zero biases.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers, tie, **config_overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **save_kwargs)
    build_byte_tokenizer().save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(directory)
    return Path(directory)
