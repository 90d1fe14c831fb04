"""Post-hoc interpolation between a base model and a model trained from it (WiSE-FT, Wortsman et al. 2022), streamed.

`alpha` = 0 gives back the base model's function exactly, 1 the trained model's, and points between trade domain
gain for general ability without training again (`adept-ds merge`):
- a model trained whole (pt_full, pt_full_replay): every tensor becomes (1 - alpha) * base + alpha * trained;
- an expanded model (adept, llama_pro, ...; its `adept_expansion.json` names the copies): the copies' residual
  outputs (`o_proj`, `down_proj`, which expansion zeroed) are scaled by alpha, every other tensor is kept as trained.
  A copy's contribution to the residual stream is then exactly alpha times the trained one; its other tensors are
  not averaged, and the frozen backbone is the base's already. At alpha = 0 every copy adds exactly zero.

Reads one tensor at a time from the two checkpoints and writes the output shard by shard in the trained model's
layout and dtypes, so peak memory is about one output shard plus one tensor in fp32, whatever the model's size.
Shards with nothing to change are copied byte for byte. Written to a temporary directory, renamed into place.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adept_ds.model.checkpoint import Checkpoint, fingerprint_checkpoint, open_checkpoint, write_shards
from adept_ds.model.expand import MANIFEST_NAME, read_manifest
from adept_ds.model.families import get_family
from adept_ds.runtime.outputs import atomic_output_dir, check_output_dir

MERGE_RECORD = "adept_merge.json"


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha {alpha:g}: need a weight in [0, 1] (0: the base model, 1: the trained one)")
    return alpha


def scaled_copy_tensors(trained: Checkpoint) -> set[str]:
    """The expanded model's tensors that alpha scales: each trainable copy's residual outputs (weights and biases)."""
    manifest = read_manifest(trained.path)
    family = get_family(manifest["family"])
    copies = {layer["index"] for layer in manifest["layers"] if layer["trainable_copy"]}
    names = set()
    for name in trained.tensor_names:
        split = family.split_layer_key(name)
        if split is not None and split[0] in copies and family.is_residual_output(split[1]):
            names.add(name)
    return names


class _BaseTensors:
    """The base model's tensors by name, each shard opened (memory-mapped) when first needed and closed with the
    output shard that read it: mapped pages count in a process's memory."""

    def __init__(self, base: Checkpoint, stack: ExitStack):
        self.path, self.stack, self.handles = base.path, stack, {}
        self.shard_of = {name: shard for shard, names in base.shard_tensors.items() for name in names}

    def get(self, name: str) -> torch.Tensor:
        shard = self.shard_of[name]
        if shard not in self.handles:
            self.handles[shard] = self.stack.enter_context(safe_open(str(self.path / shard), framework="pt"))
        return self.handles[shard].get_tensor(name)


def _merge_shard(source: Path, target: Path, alpha: float, scaled: set[str] | None, base: Checkpoint) -> None:
    """One trained shard, merged: `scaled` names alpha multiplies (expanded models), or None to interpolate every
    tensor with the base's (a model trained whole). Arithmetic in fp32, cast back to the trained tensor's dtype."""
    tensors = {}
    with safe_open(str(source), framework="pt") as trained, ExitStack() as stack:
        base_tensors = _BaseTensors(base, stack)
        metadata = trained.metadata() or {"format": "pt"}
        for name in trained.keys():
            value = trained.get_tensor(name)
            if scaled is not None:
                tensors[name] = (value.float() * alpha).to(value.dtype) if name in scaled else value
                continue
            original = base_tensors.get(name)
            if original.shape != value.shape:
                raise ValueError(f"{name}: trained shape {tuple(value.shape)}, base {tuple(original.shape)}: not trained from this base")
            merged = original.float().mul_(1.0 - alpha).add_(value.float(), alpha=alpha)  # two fp32 copies at most
            tensors[name] = merged.to(value.dtype)
            del original, value, merged
    save_file(tensors, str(target), metadata=metadata)


def merge_checkpoints(
    base_model: str | Path, trained_model: str | Path, alpha: float, output: str | Path, overwrite: bool = False, show_progress: bool = True
) -> Path:
    """Write `output`: `trained_model` interpolated toward `base_model` by `alpha` (see the module's docstring)."""
    check_alpha(alpha)
    check_output_dir(output, overwrite)
    base, trained = open_checkpoint(base_model), open_checkpoint(trained_model)
    expanded = (trained.path / MANIFEST_NAME).is_file()
    if expanded:
        source = read_manifest(trained.path)["source_fingerprint"]
        if fingerprint_checkpoint(base) != source:
            raise ValueError(
                f"{trained.path} was expanded from a model with fingerprint {source}, not {base.path} "
                f"({fingerprint_checkpoint(base)}): give --base the model `adept-ds expand` read"
            )
        scaled = scaled_copy_tensors(trained)
    else:
        missing = sorted(set(trained.tensor_names) - set(base.tensor_names))
        if missing:
            raise ValueError(f"{trained.path} holds tensors {base.path} lacks, e.g. {missing[:3]}: not trained from this base")
        scaled = None

    def rewrite(shard: str, target: Path) -> bool:
        if scaled is not None and not scaled.intersection(trained.shard_tensors[shard]):
            return False
        _merge_shard(trained.path / shard, target, alpha, scaled, base)
        return True

    with atomic_output_dir(output, overwrite=overwrite) as staging:  # the trained model's other files travel too
        write_shards(trained, staging, rewrite, f"merge alpha={alpha:g}", show_progress)
        record = {
            "base_model": str(base.path),
            "trained_model": str(trained.path),
            "alpha": alpha,
            "kind": "expanded: copies' residual outputs scaled" if expanded else "whole: every tensor interpolated",
            "changed_tensors": sorted(scaled) if scaled is not None else "all",
        }
        (staging / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(output)
