"""Export a DeepSpeed training checkpoint as a plain Hugging Face checkpoint (safetensors).

Runs in one process on CPU, after (or without) training: DeepSpeed's `zero_to_fp32` consolidates
the ZeRO partitions of the trained tensors; frozen tensors come from the model training started
from, where they are by construction unchanged. Written to a temporary directory, renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from adept_ds.checkpoint import CONFIG_NAME, INDEX_NAME
from adept_ds.outputs import atomic_output_dir, check_output_dir
from adept_ds.train_checkpoints import incomplete_reason, newest_complete

_SKIP = {CONFIG_NAME, INDEX_NAME}


def export_checkpoint(
    checkpoint_dir: str | Path, tag: str | None, base_model: str | Path, output: str | Path, overwrite: bool = True
) -> Path:
    """Write `output` as an HF checkpoint: `base_model` with the trained tensors of checkpoint `tag`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint_dir = Path(checkpoint_dir)
    check_output_dir(output, overwrite)
    if tag is None:
        newest, _ = newest_complete(checkpoint_dir)
        if newest is None:
            raise ValueError(f"{checkpoint_dir} holds no complete checkpoint; name the checkpoint tag to export")
        tag = newest.name
    if not (checkpoint_dir / tag).is_dir():
        raise ValueError(f"checkpoint {checkpoint_dir / tag} does not exist")
    reason = incomplete_reason(checkpoint_dir / tag)
    if reason is not None:
        raise ValueError(f"checkpoint {checkpoint_dir / tag} is incomplete ({reason}); export a complete one")
    trained = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, exclude_frozen_parameters=True)
    base_model = Path(base_model)
    dtype = getattr(AutoConfig.from_pretrained(base_model), "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    state = model.state_dict()
    unknown = sorted(set(trained) - set(state))
    if unknown:
        raise ValueError(f"checkpoint {tag} holds tensors the model {base_model} lacks, e.g. {unknown[:3]}: wrong base model?")
    with torch.no_grad():
        for name, tensor in trained.items():
            state[name].copy_(tensor)
    model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype)))
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        for item in base_model.iterdir():  # tokenizer, generation config, expansion manifest
            if item.is_file() and item.name not in _SKIP and item.suffix != ".safetensors" and not (staging / item.name).exists():
                shutil.copy2(item, staging / item.name)
        (staging / "adept_export.json").write_text(
            json.dumps(
                {"checkpoint": str(checkpoint_dir / tag), "base_model": str(base_model), "trained_tensors": sorted(trained)}, indent=2
            )
        )
    return Path(output)
