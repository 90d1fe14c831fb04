"""Training checkpoints on disk: DeepSpeed's own files, made all-or-nothing, holding only what changes.

A checkpoint is `<output_dir>/checkpoints/stepNNNNNNNN/`: DeepSpeed's model and optimizer
partitions (a file per rank) without the frozen weights (`exclude_frozen_parameters`: they are the
model training started from, identified by its fingerprint), each rank's RNG state, and
`complete.json`, which rank 0 writes last, after every rank has finished writing, listing every file
with its size plus what the run trains on (backbone fingerprint, method, units). DeepSpeed's own
`latest` pointer (read by its loader and by `zero_to_fp32`) is replaced atomically only after that
marker exists. A kill at any moment therefore leaves the previous complete checkpoint as the newest
one; resuming ignores directories without a valid marker and says so. `prune` keeps the newest N
complete checkpoints (`train.keep_checkpoints`) and removes the remains of killed writes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "complete.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_tag(text: str) -> str:
    """A checkpoint's tag as a user may write it: `step500`, `500` or `step00000500` (other names stay as given)."""
    digits = text.removeprefix("step")
    return tag_for(int(digits)) if digits.isdigit() else text


def write_atomically(path: Path, text: str) -> None:
    """Write `path` so that readers see the old content or the new, never a partial file."""
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def mark_complete(checkpoint: Path, step: int, world_size: int, run: dict | None = None) -> None:
    """Seal `checkpoint` (every rank has finished writing it) and point `latest` at it.

    `run` says what the checkpoint belongs to (backbone fingerprint, method, unit names), so a resume
    can refuse a checkpoint of another model or method before DeepSpeed reads a byte of it."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    files.pop(COMPLETE_MARKER, None)
    marker = {"step": step, "world_size": world_size, **(run or {}), "files": files}
    write_atomically(checkpoint / COMPLETE_MARKER, json.dumps(marker, indent=1))
    write_atomically(checkpoint.parent / LATEST, checkpoint.name)


def incomplete_reason(checkpoint: Path) -> str | None:
    """None when `checkpoint` is complete, else why not (marker missing, a file missing or truncated)."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER}: it was interrupted while being written"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {COMPLETE_MARKER} ({err})"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def checkpoint_info(checkpoint: Path) -> dict:
    return json.loads((checkpoint / COMPLETE_MARKER).read_text())


def newest_complete(directory: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under `directory` (or None), and the newer incomplete ones skipped."""
    candidates = sorted((p for p in Path(directory).glob("step*") if p.is_dir()), key=lambda p: p.name, reverse=True)
    skipped = []
    for checkpoint in candidates:
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return checkpoint, skipped
        skipped.append((checkpoint, reason))
    return None, skipped


def check_same_run(checkpoint: Path, expected: dict) -> None:
    """Refuse to resume `checkpoint` unless it was written by a run on the same backbone, method and units: those of
    them `expected` holds (before the model is built, the units are not known yet; backbone and method always are).

    The frozen weights are not in the checkpoint: they come from the model the run starts from, so
    resuming on another backbone would silently train a different network."""
    written = checkpoint_info(checkpoint)
    for key, what in (("backbone_fingerprint", "the backbone"), ("method", "the method"), ("units", "the trained units")):
        if key == "units" and key not in expected:
            continue
        if key not in written:
            raise ValueError(f"--resume: {checkpoint} records no {key} (written by an older adept_ds?); start a new run")
        if written[key] != expected[key]:
            shown = (lambda v: f"{len(v)} units, first {v[:2]}") if key == "units" else repr
            detail = (
                f" ({written.get('backbone_model')} then, {expected.get('backbone_model')} now)" if key == "backbone_fingerprint" else ""
            )
            raise ValueError(
                f"--resume: {checkpoint} was written for {what} {shown(written[key])}, but this run has {shown(expected[key])}"
                f"{detail}. The checkpoint holds only the trained weights; it resumes only on the run it came from"
            )


def saved_steps(directory: Path) -> set[int]:
    """The steps of the complete checkpoints under `directory`."""
    return {int(p.name.removeprefix("step")) for p in Path(directory).glob("step*") if p.is_dir() and incomplete_reason(p) is None}


def prune(directory: Path, keep: int, protect: set[str] = frozenset()) -> list[Path]:
    """Keep the `keep` newest complete checkpoints; delete older complete ones and the remains of killed writes.

    Only directories older than the newest complete checkpoint are touched, so neither the newest complete
    one nor one being written is ever deleted; an incomplete one never counts towards `keep`. Each doomed
    directory is first renamed out of the `step*` namespace, so a kill mid-deletion leaves nothing that looks
    like a checkpoint. `keep` 0 keeps everything; the tags in `protect` are kept too."""
    for leftover in Path(directory).glob(".deleting-*"):  # a deletion an earlier kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    candidates = sorted(p for p in Path(directory).glob("step*") if p.is_dir())
    complete = [p for p in candidates if incomplete_reason(p) is None]
    if not complete:
        return []
    # A universal conversion (universal.py) is a derived copy, needed only to resume from its source: once a
    # newer checkpoint is complete, it goes whatever `keep` says.
    stale = [p for p in Path(directory).glob("universal-step*") if p.is_dir() and p.name.removeprefix("universal-") < complete[-1].name]
    for path in stale:
        _delete(path)
    if keep <= 0:
        return stale
    kept = set(complete[-keep:]) | {p for p in complete if p.name in protect}
    doomed = [p for p in candidates if p not in kept and p.name < complete[-1].name]
    for path in doomed:
        _delete(path)
    return stale + doomed


def _delete(path: Path) -> None:
    """Renamed out of its namespace first: a kill mid-deletion leaves nothing that looks like a checkpoint."""
    trash = path.with_name(f".deleting-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash)


@dataclass
class TrainState:
    """Everything beyond DeepSpeed's own engine state that a resumed run needs (saved as a dict in its client state)."""

    step: int = 0
    samples_seen: int = 0
    """Domain samples consumed (global), i.e. the position in the sample stream."""
    source_samples: list[int] = field(default_factory=list)
    """Of those, how many came from each source of the domain mixture (the mixture's resumable state)."""
    probe_samples_seen: int = 0
    importance: list[float] | None = None
    scales: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    """Global batches dropped for a non-finite loss (they do not count as steps)."""
    validation: list[dict] = field(default_factory=list)
    """Every validation's losses, {"step", "general", "domain"}: the forgetting guard's history."""
    lr_multiplier: float = 1.0
    """Product of the forgetting guard's cool factors so far, applied to every unit's LR scale."""
    guard_triggers: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def rng_state() -> dict:
    """This process's Python, numpy and torch RNG states (saved per rank as rng_rank{R}.pt)."""
    import random

    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
