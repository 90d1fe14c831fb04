"""Reading Hugging Face checkpoint directories (config + single or sharded safetensors) without loading weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or not readable."""


@dataclass(frozen=True)
class Checkpoint:
    """An HF checkpoint directory, validated: its config and which tensors live in which shard."""

    path: Path
    config: dict
    shard_tensors: dict[str, list[str]]
    """Shard file name -> tensor names in that shard, shards in file order."""

    @property
    def tensor_names(self) -> list[str]:
        return [name for names in self.shard_tensors.values() for name in names]

    @property
    def is_sharded(self) -> bool:
        return (self.path / INDEX_NAME).exists()


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object")
    return data


def _shard_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {err}") from err


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate an HF checkpoint directory and index its tensors by shard (headers only, no weights read)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist (expected a Hugging Face checkpoint directory)")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a Hugging Face checkpoint directory")
    config = _read_json(path / CONFIG_NAME, "model config")

    if (path / INDEX_NAME).is_file():
        weight_map = _read_json(path / INDEX_NAME, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX_NAME} has no 'weight_map'")
        shard_names = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in shard_names if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_NAME} names shard files that do not exist: {missing}")
    elif (path / SINGLE_WEIGHTS_NAME).is_file():
        weight_map, shard_names = None, [SINGLE_WEIGHTS_NAME]
    else:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".gguf", ".safetensors"))
        raise CheckpointError(
            f"{path} has neither {SINGLE_WEIGHTS_NAME} nor {INDEX_NAME} (found: {found or 'no weight files'}); "
            "adept_ds reads safetensors checkpoints: re-save the model with save_pretrained(..., safe_serialization=True)"
        )

    shard_tensors = {name: _shard_keys(path / name) for name in shard_names}
    if weight_map is not None:
        actual = {key: shard for shard, keys in shard_tensors.items() for key in keys}
        mismatched = sorted(key for key in set(weight_map) | set(actual) if weight_map.get(key) != actual.get(key))
        if mismatched:
            raise CheckpointError(
                f"{path / INDEX_NAME} does not match the shard files for {len(mismatched)} tensors, e.g. {mismatched[:3]}"
            )
    return Checkpoint(path=path, config=config, shard_tensors=shard_tensors)


def fingerprint_checkpoint(checkpoint: Checkpoint, sample_bytes: int = 1 << 20) -> str:
    """A cheap content fingerprint: config, tensor layout, and the first and last MiB of every shard.

    Reading whole multi-GB shards would make every probe/expand start slow; sampling both ends of each
    file still tells apart two checkpoints of the same architecture with different weights.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(checkpoint.config, sort_keys=True).encode())
    for shard in checkpoint.shard_tensors:
        file = checkpoint.path / shard
        size = file.stat().st_size
        digest.update(f"{shard}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(sample_bytes))
            handle.seek(max(0, size - sample_bytes))
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()[:16]


def write_shards(
    source: Checkpoint, target: Path, rewrite: Callable[[str, Path], bool], desc: str, show_progress: bool = True
) -> list[str]:
    """Write `source`'s checkpoint into the directory `target`, shard by shard: `rewrite(shard, target / shard)` writes
    a shard itself and returns True, or returns False to have it copied byte for byte. Then every other file (config,
    index, tokenizer, generation config, manifests). Returns the rewritten shards."""
    shard_bytes = {shard: (source.path / shard).stat().st_size for shard in source.shard_tensors}
    rewritten = []
    with tqdm(total=sum(shard_bytes.values()), unit="B", unit_scale=True, desc=desc, disable=not show_progress) as progress:
        for shard in source.shard_tensors:
            if rewrite(shard, target / shard):
                rewritten.append(shard)
            else:
                shutil.copyfile(source.path / shard, target / shard)
            progress.update(shard_bytes[shard])
    for item in source.path.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, target / item.name)
    return rewritten
