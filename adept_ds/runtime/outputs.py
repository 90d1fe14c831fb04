"""Writing output directories all-or-nothing: build in a hidden sibling, rename into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` holds something we must not replace."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"output directory {path} exists and is not empty; pass --overwrite to replace it")
    return path


@contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block finishes without error.

    On any exception the temporary directory is removed and `path` is left exactly as it was, so a
    crash or a bad input never leaves a half-written checkpoint where a user would load it.
    """
    path = check_output_dir(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes 0700; a checkpoint should be readable like any directory
        if path.exists():
            retired = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
