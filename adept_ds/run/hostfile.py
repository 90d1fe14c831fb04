"""DeepSpeed/MPI hostfiles, read as DeepSpeed's launcher reads them (`adept-ds check` and `adept-ds train`)."""

from __future__ import annotations

import re
from pathlib import Path

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
