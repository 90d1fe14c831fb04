"""The training loss of a causal LM without its whole logits tensor, accumulated in fp32 in every precision.

Hugging Face's causal-LM forward builds the (tokens x vocab) logits, its loss upcasts them to fp32 and
keeps their log-softmax, and backward makes their gradient: three vocab-wide tensors. With SmolLM2's 49k
vocabulary that is ~290 MB per 512 tokens, the largest transient of an ADEPT step (whose own state is
small); with a 128k vocabulary and 4k-token sequences it is several GB (8 GB per sample in bf16 runs).

`chunked_cross_entropy` computes the same loss a chunk of tokens at a time: each chunk's logits are made
in the weights' dtype (a bf16 GEMM accumulates in fp32 internally, as HF's head does), upcast, and their
log-sum-exp, loss and softmax gradient taken in fp32, as HF's loss does for all tokens at once. The
gradients are computed in that same pass, so backward needs neither the logits nor another head GEMM:
what waits for backward is d loss / d hidden (the size of the hidden states) and, only when the head
trains (pt_full), d loss / d head weight, summed over the chunks in fp32 (vocab x hidden, 4 bytes each).
torch's own `linear_cross_entropy` does this too, but returns a bf16 loss for bf16 inputs (the logged
loss quantised to ~3 digits).

`use_chunked_loss` makes `model(input_ids=..., labels=...)` return that loss (as `.loss`, the mean
next-token cross-entropy HF computes, in fp32). The head is still called as a module, so ZeRO-3 gathers
and releases its weight (tied to the embedding or not) as before; with `labels=None` both calls behave
as they always did. Not for fp16: the precomputed gradients are scaled by 1/tokens before the loss scale
reaches them, and would underflow fp16's range (fp16 runs keep HF's loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adept_ds.model.families import Family

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 24
"""On CPU, tokens per chunk are chosen so that a chunk's logits hold at most this many values (64 MB in fp32)."""
GPU_CHUNK_BYTES = 1 << 29
"""On a GPU, a chunk's fp32 logits may take this many bytes (2048 rows at SmolLM2's 49k vocabulary, GPU_MIN_ROWS at
Llama-3's 128k; with logsumexp's fp32 temporary and the low-precision copies the chunk's transient is about twice that)."""
GPU_MIN_ROWS = 1024
"""Each chunk's two GEMMs read the whole head weight (1-2 GB at 7-70B) for 2 x rows FLOPs per weight byte (bf16):
at 1024 rows that is ~3x an H100's ridge point (989 dense bf16 TFLOP/s over 3.35 TB/s = ~295 FLOP/byte), so the
head runs compute-bound. 2^24 logits (the CPU rule) give 128 rows at 128k vocabulary: memory-bound, re-reading the
weight 8x as often."""


def chunk_rows(vocab_size: int, gpu: bool = False) -> int:
    """Tokens per chunk, a power of two: on CPU the largest whose logits fit CHUNK_LOGITS (at least 1); on a GPU the
    largest whose fp32 logits fit GPU_CHUNK_BYTES, at least GPU_MIN_ROWS (a sequence shorter than that is one chunk)."""
    if gpu:
        return max(GPU_MIN_ROWS, 1 << max(0, (GPU_CHUNK_BYTES // (4 * vocab_size)).bit_length() - 1))
    return 1 << max(0, (CHUNK_LOGITS // vocab_size).bit_length() - 1)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position of each sequence predicts nothing (as in HF)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, hidden_grad, weight_grad):
        kept = targets != IGNORE_INDEX
        count = kept.sum()
        per_token = kept / count  # d mean / d token loss, 0 where ignored (HF: nan when nothing is kept)
        safe_targets = targets.clamp(min=0)  # an ignored position's target is never used
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
        for start in range(0, hidden.shape[0], rows):
            chunk, target = hidden[start : start + rows], safe_targets[start : start + rows, None]
            logits = (chunk @ weight.T).float()
            log_total = logits.logsumexp(-1, keepdim=True)
            loss += ((log_total - logits.gather(1, target)).squeeze(1) * kept[start : start + rows]).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d mean / d logits = (softmax - one_hot(target)) / kept tokens, in fp32 like HF's; then one cast.
            grad = logits.sub_(log_total).exp_()
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad = grad.mul_(per_token[start : start + rows, None]).to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start : start + rows])
            if grad_weight is not None and grad.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.T, chunk)
            elif grad_weight is not None:  # bf16: each chunk's product is rounded once, the sum kept in fp32
                grad_weight += grad.T @ chunk
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors  # d mean / d input; grad_loss scales them (1/accumulation steps)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss  # a 0-dim fp32 factor: computed in fp32, rounded once to hidden's dtype
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (fp32) of `hidden @ weight.T` (tokens x hidden, vocab x hidden) against `targets`
    (IGNORE_INDEX skipped), never holding more than one chunk of `rows` tokens' logits (default: chunk_rows)."""
    grad = torch.is_grad_enabled()
    rows = rows or chunk_rows(weight.shape[0], gpu=hidden.device.type == "cuda")
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, rows, grad and hidden.requires_grad, grad and weight.requires_grad)


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
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets)

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
