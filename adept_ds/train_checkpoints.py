"""Training checkpoints on disk: DeepSpeed's own files, made all-or-nothing.

A checkpoint is `<output_dir>/checkpoints/stepNNNNNNNN/`: DeepSpeed's model and optimizer
partitions (a file per rank), each rank's RNG state, and `complete.json`, which rank 0 writes
last, after every rank has finished writing, listing every file with its size. DeepSpeed's own
`latest` pointer (read by its loader and by `zero_to_fp32`) is replaced atomically only after
that marker exists. A kill at any moment therefore leaves the previous complete checkpoint as
the newest one; resuming ignores directories without a valid marker and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "complete.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def write_atomically(path: Path, text: str) -> None:
    """Write `path` so that readers see the old content or the new, never a partial file."""
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def mark_complete(checkpoint: Path, step: int, world_size: int) -> None:
    """Seal `checkpoint` (every rank has finished writing it) and point `latest` at it."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    files.pop(COMPLETE_MARKER, None)
    write_atomically(checkpoint / COMPLETE_MARKER, json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))
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
