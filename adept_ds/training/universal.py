"""Resume at another world size: DeepSpeed's universal checkpoints, made safe for frozen weights and unit-wise LRs.

A ZeRO checkpoint holds one optimizer partition per rank, so it loads only at the world size that wrote it.
DeepSpeed's `ds_to_universal` rewrites it as one file per parameter (fp32 weight, both Adam moments), which
loads at any world size under `"checkpoint": {"load_universal": true}`. adept_ds uses that, and handles
what DeepSpeed 0.19 leaves to the caller:
- The conversion runs before the process group exists (`convert_before_start`): one process of the job converts,
  with worker processes, while the others wait on the filesystem, so no collective's timeout bounds it (a 70B
  checkpoint takes far longer than `train.timeout_minutes` to rewrite). It goes to `checkpoints/universal-<tag>`,
  built under a temporary name and renamed once DeepSpeed has finished and a marker is written, so an interrupted
  conversion is redone from the intact checkpoint and never looks complete. Its name is outside `step*`: it is not
  a resumable checkpoint of its own.
- The ZeRO-3 loader copies the first param group's hyperparameters into every group and gives every group the
  same `step` tensor object, which AdamW then advances once per group per step. `repair_after_load` restores
  each group's own hyperparameters (the LRs then come from the unit scales in the trainer state) and gives
  each group its own step counter.
- Only rank 0's client state is read: the trainer state is the same on every rank. RNG state is per rank and
  cannot be mapped to other ranks, so it is derived from the seed, step and rank.
- The global batch (and the global probe batch of the importance passes) must stay the same, so that the same
  sample stream continues: `keep_global_batch` re-derives micro-batch x accumulation for the new world size.
The frozen backbone is checked by fingerprint before any conversion (checkpoints.check_same_run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from adept_ds.run.config import RunConfig
from adept_ds.runtime.distributed import usable_cpus
from adept_ds.runtime.file_lock import exclusive
from adept_ds.training.checkpoints import check_same_run, checkpoint_info, newest_complete, write_atomically

PREFIX = "universal-"
MARKER = "universal.json"


def universal_tag(tag: str) -> str:
    return PREFIX + tag


def convert(directory: Path, tag: str, workers: int | None = None) -> tuple[str, bool]:
    """`directory/tag` as a universal checkpoint `directory/universal-<tag>`: (its tag, whether this process converted it).

    Any number of processes may ask at once: one converts (with `workers` processes, default conversion_workers),
    the others wait for it on the filesystem (file_lock.py). A complete earlier conversion is reused; the remains of
    an interrupted one are removed first."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target, source = directory / universal_tag(tag), directory / tag
    with exclusive(directory / f"{target.name}.lock", (target / MARKER).is_file, f"converting {source} to {target.name}") as held:
        if held is None:
            return target.name, False
        for leftover in [target, *directory.glob(f".converting-{tag}-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        staging = directory / f".converting-{tag}-{os.getpid()}"
        workers = workers or conversion_workers(source)
        held.start_heartbeat()
        ds_to_universal(
            SimpleNamespace(
                input_folder=str(source),
                output_folder=str(staging),
                # Forked workers: safe here, before the process group (convert_before_start); they only read and write files.
                num_extract_workers=workers,
                num_merge_workers=workers,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,  # ZeRO-1/2: our checkpoints carry no universal_checkpoint_info
            )
        )
        (directory / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer, at our temporary name
        info = checkpoint_info(source)
        write_atomically(staging / MARKER, json.dumps({"source": tag, "step": info["step"], "source_world_size": info["world_size"]}))
        os.replace(staging, target)
    return target.name, True


def conversion_workers(source: Path) -> int:
    """Processes for ds_to_universal: this process's cores, at most one per rank file, and as many as memory holds.

    An extract worker loads one rank's optimizer file whole (fp32 master and both moments of that rank's share) and
    writes its fragments; a merge worker holds one parameter's states, less than a rank file at any scale this
    targets (70B on 64 ranks: a rank file of pt_full is ~13 GB, its largest parameter's states ~8 GB). Two rank
    files of memory per worker leave room for the copies made while fragments are written."""
    import psutil

    rank_files = sorted(source.glob("*optim_states.pt"))
    largest = max((f.stat().st_size for f in rank_files), default=1)
    by_memory = int(psutil.virtual_memory().available // (2 * largest))
    return max(1, min(usable_cpus(), len(rank_files) or 1, by_memory))


def convert_before_start(directory: Path, resume: bool | str, identity: dict, world_size: int) -> None:
    """Every rank, before the process group exists: when the checkpoint a resume will continue was written at another
    world size, one process converts it while the others wait on the filesystem, so no collective's timeout
    (train.timeout_minutes) bounds a conversion of any size. `identity`: what of the run is known before the model is
    built (backbone, method), checked first; resume_tag checks the rest and finds the conversion done."""
    from tqdm import tqdm

    newest = newest_complete(directory)[0] if resume else None
    written_by = checkpoint_info(newest)["world_size"] if newest is not None else world_size
    if written_by == world_size:
        return
    check_same_run(newest, identity)  # never convert another run's checkpoint
    workers, started = conversion_workers(newest), time.perf_counter()
    tag, converted = _convert_or_refuse(directory, newest, workers)
    if converted:  # by this process (a finished earlier conversion, or another process's, is reused)
        when = "inside the process group" if dist.is_initialized() else "before the process group started"
        tqdm.write(
            f"resume: {newest} was written by {written_by} ranks, this run has {world_size}: converting it to a universal checkpoint "
            f"took {time.perf_counter() - started:.1f} s ({workers} workers, {when}): {directory / tag}"
        )


def _convert_or_refuse(directory: Path, checkpoint: Path, workers: int) -> tuple[str, bool]:
    """convert(), any failure (also the holder's, which waiters raise) as the ValueError every rank raises."""
    try:
        return convert(directory, checkpoint.name, workers)
    except Exception as err:
        written_by = checkpoint_info(checkpoint)["world_size"]
        raise ValueError(
            f"--resume: converting {checkpoint} to a universal checkpoint failed ({type(err).__name__}: {err}); "
            f"resume on the {written_by} ranks that wrote it"
        ) from err


def is_universal(tag: str) -> bool:
    return tag.startswith(PREFIX)


def source_tag(tag: str) -> str:
    """The regular checkpoint a universal one was converted from."""
    return tag.removeprefix(PREFIX)


def keep_global_batch(config: RunConfig, world_size: int, directory: Path) -> tuple[RunConfig, list[str]]:
    """`config` with micro-batch x accumulation (and the importance passes' per-rank batch) re-derived so that
    the global batches of the run in `directory` stay what they were; unchanged for a run with no checkpoint.

    The micro-batch stays as configured when it divides the per-rank share, else becomes the largest size
    below it that does. Every checkpoint of a run has the same global batch, so any rank may read it."""
    newest, _ = newest_complete(directory)
    if newest is None or "global_batch" not in checkpoint_info(newest):
        return config, []
    saved = checkpoint_info(newest)
    train, importance, notes = config.train, config.importance, []

    def share(total: int, what: str) -> int:
        if total % world_size:
            fits = [n for n in range(1, total + 1) if total % n == 0]
            raise ValueError(
                f"--resume: the run's {what} of {total} samples cannot be split evenly over {world_size} ranks; "
                f"resume on a world size that divides {total} (e.g. {', '.join(map(str, fits[-4:]))})"
            )
        return total // world_size

    per_rank = share(saved["global_batch"], "global batch")
    micro = max(m for m in range(1, min(train.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    accumulation = per_rank // micro
    if (micro, accumulation) != (train.micro_batch_size, train.gradient_accumulation_steps):
        notes.append(
            f"global batch {saved['global_batch']} = micro {micro} x accumulation {accumulation} x {world_size} ranks "
            f"(configured: micro {train.micro_batch_size} x accumulation {train.gradient_accumulation_steps})"
        )
        train = dataclasses.replace(train, micro_batch_size=micro, gradient_accumulation_steps=accumulation)
    probe = share(saved["probe_batch"], "importance probe batch")
    if probe != importance.batch_size:
        notes.append(
            f"importance probe batch {saved['probe_batch']} = {probe} per rank x {world_size} ranks (configured: {importance.batch_size})"
        )
        importance = dataclasses.replace(importance, batch_size=probe)
    return dataclasses.replace(config, train=train, importance=importance), notes


def group_hyperparameters(optimizer) -> list[dict]:
    """Each param group's settings but its parameters, to restore after a universal load."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def repair_after_load(engine, hyperparameters: list[dict]) -> None:
    """Undo what DeepSpeed's universal loader flattens: every group's own hyperparameters, and under ZeRO-3 a
    step counter per group (it hands one tensor to all, which AdamW would advance once per group per step)."""
    for group, saved in zip(engine.optimizer.param_groups, hyperparameters, strict=True):
        group.update(saved)
    inner = getattr(engine.optimizer, "optimizer", None)
    for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        state = inner.state.get(flat) if inner is not None else None
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A rank's RNG seed after a resume at another world size (the old ranks' RNG states map to no new rank)."""
    return (seed * 1_000_003 + step * 10_007 + rank) % 2**63


def resume_tag(directory: Path, resume: bool | str, run_identity: dict, world_size: int) -> str | None:
    """Rank 0's decision for every rank (engine.Trainer): the checkpoint in `directory` to resume from, converted
    to a universal one when another world size wrote it; None to start afresh; or a ValueError.
    `resume`: False (a new run), True (--resume), "auto" (--auto-resume)."""
    from tqdm import tqdm

    newest = None
    if resume:
        newest, skipped = newest_complete(directory)
        for incomplete, reason in skipped:
            tqdm.write(f"resume: ignoring incomplete checkpoint {incomplete} ({reason})")
        if newest is None and resume != "auto":
            raise ValueError(f"--resume: no complete checkpoint in {directory} (nothing to resume from)")
    if newest is None:
        if any(directory.glob("step*")):
            raise ValueError(
                f"{directory} holds checkpoints of an earlier run; pass --resume (or --auto-resume) to continue it, or choose a new output_dir"
            )
        return None
    check_same_run(newest, run_identity)  # before any conversion: never convert another run's checkpoint
    written_by = checkpoint_info(newest)["world_size"]
    if written_by == world_size:
        return newest.name
    # Converted by convert_before_start. Forked workers are not safe inside a CUDA/NCCL process: one here.
    tag, converted = _convert_or_refuse(directory, newest, workers=1)
    if converted:  # only where the checkpoint appeared after convert_before_start looked (another view of NFS)
        tqdm.write(f"resume: {newest} was written by {written_by} ranks, this run has {world_size}: converted it to a universal checkpoint")
    tqdm.write(f"resume: {directory / tag} (written by {written_by} ranks) loads on {world_size}")
    return tag
