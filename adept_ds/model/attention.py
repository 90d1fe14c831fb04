"""The attention kernel a run loads its model with (`model.attn_implementation`), chosen once before the run starts.

`auto` takes flash-attention 2 where it runs (an Ampere or newer GPU, bf16 or fp16, flash-attn installed), else sdpa
(torch's scaled_dot_product_attention: on CPU, and on a GPU without flash-attn). A named kernel that cannot run
here is refused with the reason, before any process group starts.

Every kernel offered honours the document mask (data.document_mask), so none is refused for it: given position
ids that restart at each document, no attention mask and no KV cache, transformers 5 builds the block-diagonal
causal mask for eager, sdpa and flex attention (masking_utils.find_packed_sequence_indices), and flash-attention 2
takes its varlen path, which it does for a batch of one row only: data/blocks.py passes it each batch as one row.
tests/test_document_mask.py checks eager, sdpa and flex attention (its forward: it has no backward on CPU) against
documents scored alone, and the one-row layout on sdpa.
"""

from __future__ import annotations

FLASH_ATTENTION = "flash_attention_2"


def flash_attention_missing() -> str | None:
    """Why flash-attention 2 cannot run in this process (None: it can): transformers' own check (flash-attn 2.3.3 or
    later, with CUDA), and an Ampere or newer GPU (compute capability 8.0), which its kernels need."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "the flash-attn package is not installed (2.3.3 or later, with CUDA)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the flash-attn package is not usable on this GPU (compute capability {major}.{minor}; it needs 8.0 or newer)"
    return None


def resolve_attention(requested: str, gpu: bool, half: bool) -> tuple[str, str]:
    """(the kernel, why it was chosen) for `model.attn_implementation=requested` on a GPU or CPU, in bf16/fp16
    (`half`) or fp32. Raises ValueError, one line, for a kernel that cannot run there."""
    setting = f"model.attn_implementation={requested}"
    if requested == "auto":
        if not gpu:
            return "sdpa", f"{setting}: on CPU"
        if not half:
            return "sdpa", f"{setting}: {FLASH_ATTENTION} needs bf16 or fp16, and this run is fp32"
        missing = flash_attention_missing()
        if missing:
            return "sdpa", f"{setting}: {missing} (pip install flash-attn for {FLASH_ATTENTION})"
        return FLASH_ATTENTION, f"{setting}: a GPU, bf16 or fp16, and flash-attn installed"
    if requested == FLASH_ATTENTION:
        if not gpu:
            raise ValueError(f"{setting} needs a GPU; on CPU take sdpa (or auto)")
        if not half:
            raise ValueError(
                f"{setting} needs bf16 or fp16, and this run's DeepSpeed config is fp32: take a bf16 config (deepspeed: zero3_bf16) or sdpa"
            )
        missing = flash_attention_missing()
        if missing:
            raise ValueError(f"{setting}: {missing}: pip install flash-attn on an Ampere or newer GPU, or take sdpa (or auto)")
    if requested == "flex_attention" and not gpu:
        raise ValueError(f"{setting}: torch's FlexAttention has no backward on CPU; take sdpa (or auto)")
    return requested, setting


def describe_attention(kernel: str, why: str, document_mask: bool) -> str:
    """The run's `attention:` line."""
    mask = "on: position ids restart at each document, which attends only to itself" if document_mask else "off"
    one_row = " (each batch passed as one row, flash-attention 2's varlen path)" if document_mask and kernel == FLASH_ATTENTION else ""
    return f"{kernel} ({why}); data.document_mask {mask}{one_row}"
