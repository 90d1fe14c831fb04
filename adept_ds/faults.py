"""What a training run does when the world misbehaves: signals, dead peers, injected faults.

- SIGTERM / SIGUSR1 (Slurm preemption, `docker stop`, a launcher tearing down): remembered, and
  the trainer checkpoints at the end of the current step and exits (`StopRequest`).
- A peer rank that died (SIGKILL, OOM killer): launchers answer by sending SIGTERM to the others.
  A checkpoint is then impossible (it needs every rank), so the handler names the dead rank and
  exits at once. Ranks find each other's pids in `<output_dir>/ranks/rank{R}.json`.
- `ADEPT_DS_FAULT=<point>:<step>:<rank>` kills this rank with SIGKILL when it reaches the named
  point at that step: how the tests interrupt a checkpoint write for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PEER_DIED = 3
EXIT_STOPPED = 143  # 128 + SIGTERM, what shells and schedulers expect of a terminated job


class RankRegistry:
    """Each rank's host and pid, so that a rank can tell which of its peers died."""

    def __init__(self, output_dir: Path, rank: int, world_size: int):
        self.directory = Path(output_dir) / "ranks"
        self.rank, self.world_size = rank, world_size
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "state": "running"}
        self._write(record)

    def _write(self, record: dict) -> None:
        path = self.directory / f"rank{self.rank}.json"
        staging = path.with_name(f".{path.name}.partial")
        staging.write_text(json.dumps(record))
        os.replace(staging, path)

    def finished(self) -> None:
        self._write({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "state": "finished"})

    def dead_peers(self) -> list[dict]:
        """Peers on this host whose process is gone (or a zombie) without having finished."""
        host, dead = socket.gethostname(), []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                record = json.loads((self.directory / f"rank{rank}.json").read_text())
            except (OSError, ValueError):
                continue
            if record.get("host") != host or record.get("state") != "running":
                continue
            try:
                alive = psutil.Process(record["pid"]).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                dead.append(record)
        return dead


def exit_if_a_peer_died(registry: RankRegistry) -> None:
    """Name the dead peer ranks and exit at once: the main thread may sit in a collective with them."""
    dead = registry.dead_peers()
    if dead:
        names = ", ".join(f"rank {r['rank']} (pid {r['pid']} on {r['host']})" for r in dead)
        print(
            f"adept_ds: rank {registry.rank}: stopping because {names} died; the job cannot continue without it. "
            f"Rerun with --resume to continue from the newest complete checkpoint in {registry.directory.parent / 'checkpoints'}.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_PEER_DIED)


class StopRequest:
    """Turns SIGTERM/SIGUSR1 into a flag the training loop checks at step boundaries."""

    def __init__(self, registry: RankRegistry):
        self.signal_name: str | None = None
        self.registry = registry
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        exit_if_a_peer_died(self.registry)  # then the launcher is tearing the job down: no checkpoint possible
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fault_point(point: str, step: int, rank: int) -> None:
    """Die here, by SIGKILL, if ADEPT_DS_FAULT names this point, step and rank (tests only)."""
    wanted = os.environ.get("ADEPT_DS_FAULT")
    if wanted and wanted == f"{point}:{step}:{rank}":
        sys.stderr.write(f"adept_ds: injected fault {wanted}: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
