"""Everything about a run's inputs that can be checked before any process group starts.

`preflight()` runs on every rank before `init_distributed`, and in `adept-ds check` on the login
node before a job is submitted: config values and paths, the model and its expansion manifest, a
probe result's model fingerprint, the DeepSpeed config (with its "auto" values filled from the
run config and its batch arithmetic checked against the world size), and a hostfile.
Each error names the bad value and what would be valid.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from adept_ds.config import RunConfig
from adept_ds.zeropp import apply_zeropp, check_quantized_options


@dataclass
class Preflight:
    checkpoint: object
    """The model checkpoint (adept_ds.checkpoint.Checkpoint)."""
    family: object
    manifest: dict | None
    probe_layers: list[int] | None
    ds_config: dict
    layout: object
    """Where frozen weights live and the ZeRO-3 window (adept_ds.frozen_weights.MemoryLayout)."""


def preflight(config: RunConfig, world_size: int, gpu: bool) -> Preflight:
    from adept_ds.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.expand import read_manifest
    from adept_ds.families import get_family
    from adept_ds.frozen_weights import device_bytes
    from adept_ds.probe import layers_from_probe

    config.validate_paths()
    checkpoint = open_checkpoint(config.model)
    family = get_family(checkpoint.config.get("model_type"))
    num_layers = checkpoint.config["num_hidden_layers"]
    manifest = read_manifest(config.model) if config.spec.expanded else None
    if manifest and manifest["num_layers"] != num_layers:
        raise ValueError(
            f"{config.model}: its expansion manifest describes {manifest['num_layers']} layers but the model has {num_layers}; "
            "the manifest belongs to another model: re-run `adept-ds expand`"
        )
    probe_layers = None
    if config.spec.trains == "probe_layers":
        probe_layers = layers_from_probe(config.probe, config.k, fingerprint_checkpoint(checkpoint), num_layers)
    layout, ds_config = memory_layout(config, world_size, gpu, checkpoint.config, device_bytes(config, gpu))
    return Preflight(checkpoint, family, manifest, probe_layers, ds_config, layout)


def memory_layout(config: RunConfig, world_size: int, gpu: bool, model_config: dict, memory: int | None):
    """(MemoryLayout, the resolved DeepSpeed config) for `memory` bytes per rank (frozen_weights.py chooses).

    The engine calls it again once the process group exists, with the smallest memory of any rank, so that
    every rank takes the same layout on nodes that differ."""
    from adept_ds.frozen_weights import MemoryLayout, choose_layout

    ds_config = resolve_ds_config(config.deepspeed, config, world_size, gpu, model_config)
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return MemoryLayout("replicated", False, "ZeRO stage < 3 keeps every weight whole on every rank"), ds_config
    layout = choose_layout(config, world_size, gpu, memory, auto_window=window_is_auto(config.deepspeed))
    return layout, resolve_ds_config(config.deepspeed, config, world_size, gpu, model_config, layout.wide_window)


def check_corpus_size(name: str, path: str, num_blocks: int, config: RunConfig, world_size: int) -> None:
    """A corpus must fill at least one global batch (micro batch x accumulation x ranks)."""
    train = config.train
    global_batch = train.global_batch(world_size)
    if num_blocks < global_batch:
        raise ValueError(
            f"{name} corpus {path} has {num_blocks} blocks of {config.data.block_size} tokens, fewer than one global batch "
            f"({global_batch} = micro {train.micro_batch_size} x accumulation {train.gradient_accumulation_steps} x {world_size} ranks); "
            "add data or lower train.micro_batch_size / data.block_size"
        )


def launched_world_size() -> int:
    from adept_ds.distributed import discover_ranks

    discover_ranks()  # mpirun sets only its own names (OMPI_COMM_WORLD_SIZE, PMI_SIZE): read them first
    return int(os.environ.get("WORLD_SIZE", "1"))


DEEPSPEED_WINDOW = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}
"""DeepSpeed's defaults for ZeRO-3's parameter window, in parameters: the caps of adept_ds's "auto" values."""
WINDOW_LAYERS = {"stage3_prefetch_bucket_size": 1, "stage3_max_live_parameters": 3, "stage3_max_reuse_distance": 1}
"""The "auto" values in decoder layers: prefetch one ahead, about three gathered, release unless reused within one."""


def window_is_auto(path: str | Path) -> bool:
    """The DeepSpeed config leaves (some of) ZeRO-3's parameter window to adept_ds ("auto")."""
    zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    return any(zero.get(key) == "auto" for key in DEEPSPEED_WINDOW)


def resolve_ds_config(
    path: str | Path, config: RunConfig, world_size: int, gpu: bool, model_config: dict, wide_window: bool = False
) -> dict:
    """The DeepSpeed config with every "auto" filled from the run config, the world size, the device and the model,
    and train.zeropp's ZeRO++ keys set (quantized options refused where they cannot work: zeropp.py).

    ZeRO-3's parameter window: `wide_window` (when the memory plan says gathered weights fit: frozen_weights.py)
    takes DeepSpeed's defaults, so a layer gathered for forward stays live for its backward. Otherwise it is
    sized in decoder layers (`model_config`'s shape), capped at DeepSpeed's defaults: prefetch one layer ahead, about three layers gathered, and a gathered layer released once
    used unless it is needed again within a layer. The fixed defaults (5e7 / 1e9 / 1e9 parameters) gather
    a small model whole: its prefetch runs ahead without bound and every layer stays gathered from
    forward to backward (for SmolLM2-135M, ~400 MB of fp32 weights per rank the step never needs at once).
    """
    try:
        ds = json.loads(Path(path).read_text())
    except ValueError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"{path}: remove the '{section}' section; adept_ds builds the {section} from the run config "
                f"('{section}:' keys) so that it can give every unit its own learning rate"
            )
    micro, gas = config.train.micro_batch_size, config.train.gradient_accumulation_steps
    auto = {
        ("train_micro_batch_size_per_gpu",): micro,
        ("gradient_accumulation_steps",): gas,
        ("train_batch_size",): micro * gas * world_size,
        ("gradient_clipping",): config.train.gradient_clipping,
        ("bf16", "enabled"): gpu,
        ("fp16", "enabled"): False,
        ("zero_optimization", "offload_optimizer", "pin_memory"): gpu,
        ("zero_optimization", "offload_param", "pin_memory"): gpu,
    }
    if ds.get("zero_optimization", {}).get("stage") == 3:
        from adept_ds.families import decoder_layer_numel

        # Never above DeepSpeed's defaults: a model whose layers are that large already gets a window of layers.
        layer = decoder_layer_numel(model_config)
        for key, default in DEEPSPEED_WINDOW.items():
            auto[("zero_optimization", key)] = default if wide_window else min(WINDOW_LAYERS[key] * layer, default)

    def fill(node, keys):
        for key, value in list(node.items()):
            here = (*keys, key)
            if isinstance(value, dict):
                fill(value, here)
            elif value == "auto":
                if here not in auto:
                    raise ValueError(f"{path}: '{'.'.join(here)}' is \"auto\" but adept_ds has no value for it; set it explicitly")
                node[key] = auto[here]

    fill(ds, ())
    for keys in [("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",), ("train_batch_size",), ("gradient_clipping",)]:
        ds.setdefault(keys[0], auto[keys])
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size:
        raise ValueError(
            f"{path}: train_batch_size={ds['train_batch_size']} != micro batch {ds['train_micro_batch_size_per_gpu']} x "
            f'accumulation {ds["gradient_accumulation_steps"]} x world size {world_size}; set them to "auto"'
        )
    for precision in ("bf16", "fp16"):
        if not gpu and ds.get(precision, {}).get("enabled"):
            raise ValueError(f'{path}: {precision} is enabled but this run is on CPU; use zero3.json ("auto": fp32 on CPU, bf16 on GPU)')
    fill_grad_accum_dtype(ds, path)
    zero = ds.get("zero_optimization", {})
    check_quantized_options(zero, gpu, path)
    apply_zeropp(zero, config, world_size, path)
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def fill_grad_accum_dtype(ds: dict, path: str | Path) -> None:
    """bf16 under ZeRO-2/3 accumulates gradients in fp32 unless the config says otherwise (it says so once).

    DeepSpeed's default is the model's dtype: bf16 sums of micro-batch gradients and bf16 gradient partitions.
    ZeRO-2 and 3 honour `data_types.grad_accum_dtype` (their gradient partitions become fp32: 4 bytes per
    trainable parameter / ranks). Not ZeRO-1, where DeepSpeed then swaps in its BF16_Optimizer, a path adept_ds
    is not tested on, nor ZeRO off, where DeepSpeed refuses bf16 with fp32 accumulation.
    """
    if not ds.get("bf16", {}).get("enabled") or ds.get("zero_optimization", {}).get("stage") not in (2, 3):
        return
    data_types = ds.setdefault("data_types", {})
    if "grad_accum_dtype" not in data_types:
        data_types["grad_accum_dtype"] = "fp32"
        if os.environ.get("RANK", "0") == "0":
            print(f'{path}: bf16 without data_types.grad_accum_dtype: accumulating gradients in fp32 (set it to "bf16" to keep bf16)')


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Hosts and their slots from a DeepSpeed/MPI hostfile (`host slots=N` lines, # comments)."""
    from deepspeed.launcher.runner import _parse_hostfile

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"hostfile {path} does not exist (DeepSpeed would silently fall back to this machine alone)")
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        host, _, rest = text.partition(" ")
        slots = rest.strip()
        if not host or not slots.startswith("slots=") or not slots[6:].isdigit() or " " in slots:
            raise ValueError(f"hostfile {path} line {number}: {line!r} is not 'HOSTNAME slots=N' (e.g. 'worker-1 slots=8')")
        if int(slots[6:]) < 1:
            raise ValueError(f"hostfile {path} line {number}: {line!r} gives {host} no slots; need slots >= 1")
    try:
        return dict(_parse_hostfile(lines))  # DeepSpeed's own reading: what its launcher will see
    except ValueError as err:
        raise ValueError(f"hostfile {path}: {err}") from None
