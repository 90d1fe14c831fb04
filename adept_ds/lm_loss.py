"""The training loss of a causal LM without its whole logits tensor.

Hugging Face's causal-LM forward builds the (tokens x vocab) logits, its loss upcasts them to fp32 and
keeps their log-softmax, and backward makes their gradient: three vocab-wide tensors. With SmolLM2's 49k
vocabulary that is ~290 MB per 512 tokens, the largest transient of an ADEPT step (whose own state is
small); with a 128k vocabulary and 4k-token sequences it is several GB. torch's chunked
`linear_cross_entropy` computes the loss and its gradients a chunk of tokens at a time instead, with
the same FLOPs.

`use_chunked_loss` makes `model(input_ids=..., labels=...)` return that loss (as `.loss`, the mean
next-token cross-entropy HF computes). The head is still called as a module, so ZeRO-3 gathers and
releases its weight (tied to the embedding or not) as before; with `labels=None` both calls behave as
they always did. For fp32 training only: torch's op returns the loss in the input dtype and, with a
trainable head, sums its weight gradient chunk by chunk in that dtype, so in bf16 the logged loss is
quantised, and in fp16 the loss scale overflows and the precomputed gradients lose fp16's range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adept_ds.families import Family

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 24
"""Tokens per chunk are chosen so that a chunk's logits hold at most this many values (64 MB in fp32).
torch's automatic choice for fp32 makes chunks of a few tokens (N x hidden / 2 x vocab): ~10x slower on CPU."""


def chunk_options(vocab_size: int) -> torch.nn.LinearCrossEntropyOptions:
    rows = 1 << max(0, (CHUNK_LOGITS // vocab_size).bit_length() - 1)  # a power of two
    # "compact" accumulates the weight gradient in place: no vocab x hidden scratch buffer.
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows, chunking_method=None, acc_policy="compact")


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position of each sequence predicts nothing (as in HF)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def use_chunked_loss(model: nn.Module, family: Family) -> None:
    """Make `model(input_ids=..., labels=...)` compute its loss through the chunked head (in place)."""
    from transformers.modeling_outputs import CausalLMOutput

    decoder = model.get_submodule(family.decoder_path)
    head = model.get_submodule(family.head_path)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"{family.name}: the LM head is {head!r}; the chunked loss needs a bias-free nn.Linear")
    linear_forward, model_forward = head.forward, model.forward

    def head_forward(hidden: torch.Tensor, *, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return linear_forward(hidden)
        targets = next_token_targets(labels).reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        options = chunk_options(head.out_features)
        return F.linear_cross_entropy(hidden, head.weight, targets, ignore_index=IGNORE_INDEX, options=options)

    def forward(input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None, **kwargs):
        if labels is None:
            return model_forward(input_ids=input_ids, **kwargs)
        unsupported = sorted(set(kwargs) & {"num_items_in_batch", "shift_labels", "logits_to_keep", "inputs_embeds"})
        if unsupported:
            raise ValueError(f"the chunked loss does not take {unsupported}; set train.chunked_loss: false to use HF's loss")
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
        return CausalLMOutput(loss=head(hidden, labels=labels))

    # Instance attributes shadow the classes' forward; module __call__ (and so every ZeRO-3 hook) is unchanged.
    head.forward = head_forward
    model.forward = forward
