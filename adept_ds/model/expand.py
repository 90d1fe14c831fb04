"""Stage 1b: selective layer expansion with function-preserving identity copies.

Each selected decoder layer gets a copy inserted directly after it. The copy's residual-stream
outputs (`o_proj`, `down_proj`) are zero, so the copy adds nothing to the residual stream and the
expanded model computes exactly what the original did. Tensors stream shard by shard: peak memory
is one input shard plus its copies, never the whole model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from adept_ds.model.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, fingerprint_checkpoint, open_checkpoint
from adept_ds.model.families import Family, get_family
from adept_ds.runtime.outputs import atomic_output_dir, check_output_dir

MANIFEST_NAME = "adept_expansion.json"
MANIFEST_FORMAT = "adept_ds.expansion/1"
# Weight formats we never carry into the output: they would describe the unexpanded model.
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@dataclass(frozen=True)
class ExpansionPlan:
    """Where every original layer and every copy lands in the expanded model."""

    num_original_layers: int
    expanded_layers: tuple[int, ...]
    """Original indices that get a copy, ascending."""

    @property
    def num_layers(self) -> int:
        return self.num_original_layers + len(self.expanded_layers)

    def new_index(self, original: int) -> int:
        """Index of original layer `original` in the expanded model."""
        return original + sum(1 for layer in self.expanded_layers if layer < original)

    def layer_sources(self) -> list[tuple[int, bool]]:
        """For each expanded-model layer: (source original layer, is it a trainable copy)."""
        sources = []
        for layer in range(self.num_original_layers):
            sources.append((layer, False))
            if layer in self.expanded_layers:
                sources.append((layer, True))
        return sources


def plan_expansion(num_layers: int, layers: list[int]) -> ExpansionPlan:
    """Validate the layer selection (0-based original indices) against a model of `num_layers` layers."""
    bad = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
    if duplicates:
        raise ValueError(f"layer indices {duplicates} are given more than once; each layer can be expanded once")
    if not layers:
        raise ValueError("no layers to expand: give at least one layer index (k >= 1)")
    return ExpansionPlan(num_original_layers=num_layers, expanded_layers=tuple(sorted(layers)))


def uniform_layers(num_layers: int, k: int) -> list[int]:
    """LLaMA-Pro's placement: a copy after every (num_layers / k)-th layer, i.e. at the end of each of k equal groups."""
    if not isinstance(k, int) or not 1 <= k <= num_layers:
        raise ValueError(f"k={k} is out of range: choose between 1 and the number of layers ({num_layers})")
    return [(group + 1) * num_layers // k - 1 for group in range(k)]


def _expanded_config(config: dict, family: Family, plan: ExpansionPlan) -> dict:
    config = dict(config)
    num_layers = plan.num_original_layers
    for key, value in config.items():
        if isinstance(value, list) and len(value) == num_layers and key not in family.per_layer_config_keys:
            # A per-layer list we do not know how to grow would silently misalign: refuse instead.
            raise ValueError(
                f"config.json field '{key}' looks per-layer ({num_layers} entries) but adept_ds does not know how "
                f"to expand it for {family.name} models; known per-layer fields: {list(family.per_layer_config_keys)}"
            )
    for key in family.per_layer_config_keys:
        if key in config and config[key] is not None:
            if len(config[key]) != num_layers:
                raise ValueError(f"config.json '{key}' has {len(config[key])} entries for {num_layers} layers")
            config[key] = [config[key][source] for source, _ in plan.layer_sources()]
    config["num_hidden_layers"] = plan.num_layers
    return config


def _check_layer_tensors(checkpoint: Checkpoint, family: Family, plan: ExpansionPlan) -> None:
    """Every tensor of every layer must belong to a known unit, and every layer index must be in range."""
    seen_layers: dict[int, set[str]] = {}
    for name in checkpoint.tensor_names:
        split = family.split_layer_key(name)
        if split is None:
            continue
        layer, local = split
        family.unit_of(local)  # raises on a tensor we would not know how to treat
        seen_layers.setdefault(layer, set()).add(local)
    if sorted(seen_layers) != list(range(plan.num_original_layers)):
        raise ValueError(
            f"{checkpoint.path}: config says {plan.num_original_layers} decoder layers but the weights hold layers "
            f"{sorted(seen_layers)}; the checkpoint is incomplete or its config does not match"
        )
    for layer in plan.expanded_layers:
        zeroed = [local for local in seen_layers[layer] if family.is_residual_output(local)]
        if not zeroed:
            raise ValueError(f"layer {layer} has no {list(family.residual_outputs)} weights to zero")


def build_manifest(checkpoint: Checkpoint, family: Family, plan: ExpansionPlan) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "family": family.name,
        "source_model": str(checkpoint.path.absolute()),
        "source_fingerprint": fingerprint_checkpoint(checkpoint),
        "num_original_layers": plan.num_original_layers,
        "num_layers": plan.num_layers,
        "expanded_layers": list(plan.expanded_layers),
        "copied_layers": [index for index, (_, copy) in enumerate(plan.layer_sources()) if copy],
        "zero_initialized": list(family.residual_outputs),
        "layers": [{"index": index, "source": source, "trainable_copy": copy} for index, (source, copy) in enumerate(plan.layer_sources())],
    }


def _expand_shard(source: Path, target: Path, family: Family, plan: ExpansionPlan, progress: tqdm) -> dict[str, int]:
    """Write one output shard: the input shard's tensors renumbered, plus copies of expanded layers' tensors.

    Returns tensor name -> size in bytes for the output index.
    """
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            split = family.split_layer_key(name)
            if split is None:
                tensors[name] = tensor
            else:
                layer, local = split
                new = plan.new_index(layer)
                tensors[f"{family.layer_prefix(new)}{local}"] = tensor
                if layer in plan.expanded_layers:
                    copy = torch.zeros_like(tensor) if family.is_residual_output(local) else tensor.clone()
                    tensors[f"{family.layer_prefix(new + 1)}{local}"] = copy
            progress.update(1)
    save_file(tensors, str(target), metadata=metadata)
    return {name: tensor.numel() * tensor.element_size() for name, tensor in tensors.items()}


def expand_checkpoint(
    model_dir: str | Path,
    output_dir: str | Path,
    layers: list[int],
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Expand the HF checkpoint in `model_dir` by copying `layers` (original 0-based indices).

    Writes a complete HF checkpoint with the manifest `adept_expansion.json` to `output_dir`, or
    nothing at all if anything fails. Returns the manifest.
    """
    checkpoint = open_checkpoint(model_dir)
    if (checkpoint.path / MANIFEST_NAME).exists():
        raise ValueError(f"{checkpoint.path} is already an expanded model ({MANIFEST_NAME} present); expand the original model instead")
    if Path(output_dir).absolute() == checkpoint.path.absolute():
        raise ValueError(f"output directory {output_dir} is the input model directory; choose another")
    check_output_dir(output_dir, overwrite)
    family = get_family(checkpoint.config.get("model_type"))
    num_layers = checkpoint.config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{checkpoint.path / CONFIG_NAME}: 'num_hidden_layers' is {num_layers!r}, expected a positive int")
    plan = plan_expansion(num_layers, list(layers))
    config = _expanded_config(checkpoint.config, family, plan)
    _check_layer_tensors(checkpoint, family, plan)
    manifest = build_manifest(checkpoint, family, plan)

    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        sizes: dict[str, int] = {}
        weight_map: dict[str, str] = {}
        num_tensors = len(checkpoint.tensor_names)
        with tqdm(total=num_tensors, desc="expanding", unit="tensor", disable=not show_progress) as progress:
            for shard in checkpoint.shard_tensors:
                shard_sizes = _expand_shard(checkpoint.path / shard, staging / shard, family, plan, progress)
                sizes.update(shard_sizes)
                weight_map.update(dict.fromkeys(shard_sizes, shard))
        if checkpoint.is_sharded:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Tokenizer, generation config, chat template, licence: everything that is not weights or config.
        for item in checkpoint.path.iterdir():
            if item.is_file() and item.name not in (CONFIG_NAME, INDEX_NAME) and item.suffix not in _SKIPPED_SUFFIXES:
                shutil.copy2(item, staging / item.name)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(model_dir: str | Path) -> dict:
    """The expansion manifest of an expanded checkpoint."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{model_dir} has no {MANIFEST_NAME}: not a model written by `adept-ds expand`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest
