"""Export a DeepSpeed training checkpoint as a plain Hugging Face checkpoint (safetensors), streamed.

Runs in one process on CPU, after (or without) training. The output keeps the base model's layout
(the same shards, the same index) and every tensor's dtype (bf16 stays bf16):
- a shard of the base model that holds no trained tensor is copied byte for byte;
- a shard that does is rewritten: its frozen tensors read from the base shard, its trained ones
  gathered from the ZeRO partitions by DeepSpeed's `zero_to_fp32` in lazy mode (the optimizer files
  memory-mapped, one tensor assembled at a time) and cast to the base tensor's dtype.
Peak memory is therefore one shard plus the trained tensors, whatever the model size; pt_full,
where every tensor trains, consolidates shard by shard. Written to a temporary directory, renamed
into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from adept_ds.model.checkpoint import open_checkpoint, write_shards
from adept_ds.runtime.file_lock import exclusive
from adept_ds.runtime.outputs import atomic_output_dir, check_output_dir
from adept_ds.training.checkpoints import checkpoint_tag, incomplete_reason, newest_complete


def _checked_tag(checkpoint_dir: Path, tag: str | None) -> str:
    if tag is None:
        newest, _ = newest_complete(checkpoint_dir)
        if newest is None:
            raise ValueError(f"{checkpoint_dir} holds no complete checkpoint; name the checkpoint tag to export")
        tag = newest.name
    tag = checkpoint_tag(tag)
    if not (checkpoint_dir / tag).is_dir():
        saved = sorted(path.name for path in checkpoint_dir.glob("step*") if path.is_dir()) if checkpoint_dir.is_dir() else []
        raise ValueError(f"checkpoint {checkpoint_dir / tag} does not exist; saved: {', '.join(saved) or 'none'}")
    reason = incomplete_reason(checkpoint_dir / tag)
    if reason is not None:
        raise ValueError(f"checkpoint {checkpoint_dir / tag} is incomplete ({reason}); export a complete one")
    return tag


def trained_tensors(checkpoint_dir: Path, tag: str, base_names: set[str]) -> dict:
    """Name -> lazily gathered fp32 tensor (`.contiguous()` materialises it) for every trained tensor of the base model.

    Tied aliases (lm_head.weight sharing the embedding's storage) and buffers resolve to a tensor the
    base model stores under its own name, so only names of the base model are returned; a trained name
    the base model lacks means the wrong base model."""
    from adept_ds.runtime.distributed import import_deepspeed

    import_deepspeed()  # `adept-ds export` alone: its first deepspeed import
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, exclude_frozen_parameters=True, lazy_mode=True)
    stored = {id(tensor) for name, tensor in lazy.items() if name in base_names}
    unknown = sorted(name for name, tensor in lazy.items() if name not in base_names and id(tensor) not in stored)
    if unknown:
        raise ValueError(f"checkpoint {tag} holds tensors the base model lacks, e.g. {unknown[:3]}: wrong base model?")
    return {name: tensor for name, tensor in lazy.items() if name in base_names}


def _rewrite_shard(source: Path, target: Path, trained: dict) -> None:
    """`source` with its trained tensors replaced, each cast to the dtype the base model stores it in."""
    tensors = {}
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        for name in handle.keys():
            original = handle.get_tensor(name)
            if name not in trained:
                tensors[name] = original
                continue
            value = trained[name].contiguous()
            if value.shape != original.shape:
                raise ValueError(f"trained tensor {name} has shape {tuple(value.shape)}, the base model's {tuple(original.shape)}")
            tensors[name] = value.to(original.dtype)
            del original, value
    save_file(tensors, str(target), metadata=metadata)


def export_checkpoint(
    checkpoint_dir: str | Path,
    tag: str | None,
    base_model: str | Path,
    output: str | Path,
    overwrite: bool = True,
    show_progress: bool = True,
) -> Path:
    """Write `output` as an HF checkpoint: `base_model` with the trained tensors of checkpoint `tag` (default: newest complete)."""
    checkpoint_dir = Path(checkpoint_dir)
    check_output_dir(output, overwrite)
    tag = _checked_tag(checkpoint_dir, tag)
    base = open_checkpoint(base_model)
    trained = trained_tensors(checkpoint_dir, tag, set(base.tensor_names))

    def rewrite(shard: str, target: Path) -> bool:
        if not any(name in trained for name in base.shard_tensors[shard]):
            return False
        _rewrite_shard(base.path / shard, target, trained)
        return True

    with atomic_output_dir(output, overwrite=overwrite) as staging:
        rewritten = write_shards(base, staging, rewrite, "export", show_progress)
        record = {
            "checkpoint": str(checkpoint_dir / tag),
            "base_model": str(base.path),
            "trained_tensors": sorted(trained),
            "rewritten_shards": rewritten,
            "copied_shards": [shard for shard in base.shard_tensors if shard not in rewritten],
        }
        (staging / "adept_export.json").write_text(json.dumps(record, indent=2))
    return Path(output)


def export_once(checkpoint_dir: str | Path, tag: str, base_model: str | Path, output: str | Path) -> Path:
    """export_checkpoint for a job whose ranks all ask at once, with no process group (the guard's rollback): one of
    them exports while the others wait on the filesystem (file_lock.py), however long the export takes. An `output`
    that already holds this checkpoint's export is kept."""
    output, source = Path(output), str(Path(checkpoint_dir) / tag)

    def exported() -> bool:
        record = output / "adept_export.json"
        return record.is_file() and json.loads(record.read_text())["checkpoint"] == source

    with exclusive(output.with_name(output.name + ".lock"), exported, f"exporting {source} to {output}") as held:
        if held is not None:
            held.start_heartbeat()
            export_checkpoint(checkpoint_dir, tag, base_model, output, overwrite=True)
    return output
