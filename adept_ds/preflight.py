"""Everything about a run's inputs that can be checked before any process group starts.

`preflight()` runs on every rank before `init_distributed`, and in `adept-ds check` on the login
node before a job is submitted: config values and paths, the model and its expansion manifest, a
probe result's model fingerprint, the DeepSpeed config (with its "auto" values filled from the
run config and its batch arithmetic checked against the world size), and a hostfile.
Each error names the bad value and what would be valid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from adept_ds.config import RunConfig
from adept_ds.ds_config import resolve_ds_config, window_is_auto
from adept_ds.run_log import check_sinks


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
    notes: list[str]
    """How the DeepSpeed config's "auto" values were filled and what was dropped (ds_config.py), one line each."""


def preflight(config: RunConfig, world_size: int, gpu: bool) -> Preflight:
    from adept_ds.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.expand import read_manifest
    from adept_ds.families import get_family
    from adept_ds.frozen_weights import device_bytes
    from adept_ds.probe import layers_from_probe

    config.validate_paths()
    check_sinks(config.report.to)
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
    check_positions(config, checkpoint.config)
    notes = []
    layout, ds_config = memory_layout(config, world_size, gpu, checkpoint.config, device_bytes(config, gpu), notes)
    return Preflight(checkpoint, family, manifest, probe_layers, ds_config, layout, notes)


def check_positions(config: RunConfig, model_config: dict) -> None:
    """data.block_size within the model's positions, unless its config scales RoPE to reach further."""
    positions = model_config.get("max_position_embeddings")
    if positions and config.data.block_size > positions and not model_config.get("rope_scaling"):
        raise ValueError(
            f"data.block_size={config.data.block_size} is longer than {config.model}'s max_position_embeddings={positions} "
            f"(and its config has no rope_scaling): give data.block_size <= {positions}"
        )


def memory_layout(config: RunConfig, world_size: int, gpu: bool, model_config: dict, memory: int | None, notes: list | None = None):
    """(MemoryLayout, the resolved DeepSpeed config) for `memory` bytes per rank (frozen_weights.py chooses); `notes`
    receives how the final config's "auto" values were filled.

    The engine calls it again once the process group exists, with the smallest memory of any rank, so that
    every rank takes the same layout on nodes that differ."""
    from adept_ds.frozen_weights import MemoryLayout, choose_layout

    filled = []
    ds_config = resolve_ds_config(config.deepspeed, config, world_size, gpu, model_config, notes=filled)
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        if notes is not None:
            notes.extend(filled)
        return MemoryLayout("replicated", False, "ZeRO stage < 3 keeps every weight whole on every rank"), ds_config
    layout = choose_layout(config, world_size, gpu, memory, auto_window=window_is_auto(config.deepspeed))
    return layout, resolve_ds_config(config.deepspeed, config, world_size, gpu, model_config, layout.wide_window, notes)


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


HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")
"""A hostfile line as DeepSpeed's launcher reads it (deepspeed.launcher.runner._parse_hostfile): a host, any
whitespace, slots=N, and anything after (a trailing comment); blank lines and lines starting with # are skipped."""


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Hosts and their slots from a DeepSpeed/MPI hostfile, read as DeepSpeed's launcher reads it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"hostfile {path} does not exist (DeepSpeed would silently fall back to this machine alone)")
    hosts = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(text)
        if not match:
            raise ValueError(f"hostfile {path} line {number}: {line!r} is not 'HOSTNAME slots=N' (e.g. 'worker-1 slots=8')")
        host, slots = match.group(1), int(match.group(2))
        if slots < 1:
            raise ValueError(f"hostfile {path} line {number}: {line!r} gives {host} no slots; need slots >= 1")
        if host in hosts:
            raise ValueError(f"hostfile {path} line {number}: {host} is listed twice; give each host one line")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"hostfile {path} lists no hosts; add 'HOSTNAME slots=N' lines")
    return hosts
