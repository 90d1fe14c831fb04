"""What a training run does when the world misbehaves: signals, dead peers, injected faults.

- SIGTERM / SIGUSR1 (Slurm preemption, `docker stop`, a launcher tearing down): remembered, and
  the trainer checkpoints at the end of the current step and exits (`StopRequest`).
- A peer rank that died (SIGKILL, OOM killer) or failed: launchers answer by sending SIGTERM to the
  others. A checkpoint is then impossible (it needs every rank), so the handler names that rank and
  exits at once. Ranks find each other's pids and states in `<output_dir>/ranks/rank{R}.json`.
- An exception on one rank (a CUDA OOM): that rank prints it, marks its record failed and exits at
  once, with no collective (`exit_after_failure`): its peers sit in some collective (a ZeRO
  all-gather) that a teardown barrier would pair with, or wait on, until the watchdog fires. Its exit
  is what ends the job: the DeepSpeed launcher and torchrun terminate the other ranks when one exits
  non-zero, and a peer whose collective breaks finds the failed record and stops with one line.
- `ADEPT_DS_FAULT=<point>:<step>:<rank>[:raise]` kills this rank with SIGKILL (or raises a
  RuntimeError, as a CUDA OOM would) when it reaches the named point at that step: how the tests
  interrupt a checkpoint write or a step for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_FAILED = 1
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

    def failed(self) -> None:
        self._write({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "state": "failed"})

    def dead_peers(self) -> list[dict]:
        """Peers that failed (on any host: the record says so), or on this host whose process is gone
        (or a zombie) without having finished."""
        host, dead = socket.gethostname(), []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                record = json.loads((self.directory / f"rank{rank}.json").read_text())
            except (OSError, ValueError):
                continue
            if record.get("state") == "failed":
                dead.append(record)
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
        names = ", ".join(
            f"rank {r['rank']} (pid {r['pid']} on {r['host']}) " + ("failed (see its error)" if r["state"] == "failed" else "died")
            for r in dead
        )
        print(
            f"adept_ds: rank {registry.rank}: stopping because {names}; the job cannot continue without it. "
            f"Rerun with --resume to continue from the newest complete checkpoint in {registry.directory.parent / 'checkpoints'}.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_PEER_DIED)


def exit_after_failure(registry: RankRegistry) -> None:
    """End this rank now, from an `except` block of training, without any collective.

    If a peer died or failed first, this rank's exception is only the collective that broke: one line
    names the peer (exit_if_a_peer_died). Otherwise the failure is this rank's own: its traceback is
    printed, its record marked failed (what its peers read), and it exits without teardown.
    """
    exit_if_a_peer_died(registry)
    registry.failed()
    print(
        f"adept_ds: rank {registry.rank} failed; the job stops without a checkpoint (rerun with --resume to continue "
        f"from the newest complete one in {registry.directory.parent / 'checkpoints'}):\n{traceback.format_exc()}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_FAILED)


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
    """Die here by SIGKILL, or raise a RuntimeError with `:raise`, if ADEPT_DS_FAULT names this point, step and rank (tests only)."""
    wanted = os.environ.get("ADEPT_DS_FAULT", "")
    here = f"{point}:{step}:{rank}"
    if wanted == f"{here}:raise":
        raise RuntimeError(f"injected fault {wanted} (as a CUDA out-of-memory error would be raised)")
    if wanted == here:
        sys.stderr.write(f"adept_ds: injected fault {wanted}: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
