"""One process does a long piece of work on a shared filesystem while the others wait for it there.

For work that can outlast any collective's timeout, so no rank ever waits for it inside one: preparing a
token store (token_store.py), converting a checkpoint to a universal one before the process group starts
(universal.py), exporting a rolled-back checkpoint after it has ended (engine.py). Any process of any node
that sees the filesystem may take the work; the first to create the lock does it.

The lock is created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+) and names its holder. A
heartbeat thread touches it every 5 s, so waiters can tell a working holder (however long one step takes)
from a dead one: a lock untouched for STALE_S is taken over. A holder that fails leaves its error in
`<name>.error`, and those that waited for it raise that error instead of redoing the work one after the other.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

STALE_S = 120
"""A lock untouched for this long is taken over: its holder died (a live one touches it every 5 s; NFS may show an mtime up to 60 s late)."""


class HeldLock:
    """A held lock file; `start_heartbeat()` keeps it fresh (start it after forking worker pools where you can:
    a forked child inherits no thread, but a thread running at the fork may hold a lock the child then finds held)."""

    def __init__(self, path: Path):
        self.path = path
        self.released = threading.Event()

    def start_heartbeat(self) -> None:
        def beat():
            while not self.released.wait(5.0):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        threading.Thread(target=beat, daemon=True).start()

    def release(self) -> None:
        self.released.set()
        self.path.unlink(missing_ok=True)


class exclusive:
    """`with exclusive(lock, done, what) as held:` yields a HeldLock to the one process that must do the work, or
    None once `done()` holds (done by another process, or before). Waiters print once whom they wait for.

    A holder's exception is written to `<lock>.error` (waiters raise it as a ValueError), except an OSError raised
    when `done()` already holds: a race lost after a stale takeover, whose winner's result is used."""

    def __init__(self, lock: Path, done: Callable[[], bool], what: str):
        self.lock, self.done, self.what = Path(lock), done, what
        self.error_file = self.lock.with_name(self.lock.name.removesuffix(".lock") + ".error")
        self.held: HeldLock | None = None

    def __enter__(self) -> HeldLock | None:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        told, waited_since = False, time.time()
        while True:
            if self.done():
                return None
            if told and not self.lock.exists() and self._failed_since(waited_since):
                raise ValueError(self.error_file.read_text().strip())
            try:
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    age = time.time() - self.lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age > STALE_S:
                    _remove_stale(self.lock)
                    continue
                if not told:
                    holder = self.lock.read_text(errors="replace").strip() or "another process"
                    print(f"waiting for {holder} to finish {self.what}", flush=True)
                    told = True
                time.sleep(1.0)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            if self.done():  # finished between our check and our lock
                self.lock.unlink(missing_ok=True)
                return None
            self.held = HeldLock(self.lock)
            return self.held

    def _failed_since(self, moment: float) -> bool:
        try:
            return self.error_file.stat().st_mtime >= moment - 1
        except FileNotFoundError:
            return False

    def __exit__(self, kind, error, traceback) -> bool:
        lost_race = kind is not None and issubclass(kind, OSError) and self.done()
        if self.held is not None:
            if kind is not None and issubclass(kind, Exception) and not lost_race:
                host = socket.gethostname()
                self.error_file.write_text(f"{error} (found by {host} pid {os.getpid()} while {self.what})\n")
            else:
                self.error_file.unlink(missing_ok=True)
            self.held.release()
        return lost_race


def _remove_stale(lock: Path) -> None:
    """Rename, then delete: of several waiters that found the same stale lock, only one removes it."""
    retired = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, retired)
        retired.unlink()
    except FileNotFoundError:
        pass
