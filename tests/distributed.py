"""Launching real multi-process DeepSpeed runs on CPU (gloo) from tests.

`run_deepspeed(script, ...)` runs `script` as a DeepSpeed job of N ranks with the CPU accelerator, each
rank started as DeepSpeed's launcher starts it, kills them all on timeout (a hung collective must fail the
test, not CI), and raises with the tail of both output streams when any rank fails. Scripts report results by
writing `rank{R}.json` into a directory the test passes them; `read_rank_results` collects them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).parent
REPO_DIR = TESTS_DIR.parent
SCRIPTS_DIR = TESTS_DIR / "scripts"
HIDDEN_DIR = TESTS_DIR / "hidden"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What a launcher sets for its ranks. A test that ran a world of one in-process leaves them in our
# environment; passed on, they would make every rank of a launched job think it is rank 0 of 1.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cpu_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARS}
    env.update(
        DS_ACCELERATOR="cpu",
        PYTHONWARNINGS="ignore::FutureWarning",
        TOKENIZERS_PARALLELISM="false",
        # tests/hidden: MLflow hidden from DeepSpeed's import (tests/hidden/mlflow/__init__.py says why)
        PYTHONPATH=os.pathsep.join([str(HIDDEN_DIR), str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


def run_command(command: list[str], timeout: float, env: dict[str, str] | None = None, check: bool = True, cwd=None):
    """Run a launcher command in its own process group; on timeout kill the group and fail loudly."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cpu_env(), start_new_session=True, cwd=cwd
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(command)}\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit code {result.returncode}: {' '.join(command)}\n--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-6000:]}"
        )
    return result


def run_deepspeed(script: str | Path, *args: str, num_procs: int = 2, timeout: float = 600, check: bool = True, **env):
    """`script args` as a DeepSpeed job of `num_procs` real ranks on this machine (CPU, gloo); `script` is a path,
    a name in tests/scripts, or "-m" for the `adept-ds` command line (`adept_ds.cli`).

    Each rank is started the way DeepSpeed's launcher starts it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
    MASTER_ADDR and MASTER_PORT in its environment, `python -u`), and once one rank fails the others are killed,
    as the launcher does; its exit code is the job's. What is skipped is the launcher's own two Python start-ups
    (`deepspeed` then `deepspeed.launcher.launch`: 8.8 s a job on this 2-core machine, measured on a script that
    only prints), about a third of the suite's time. tests/test_launch.py, test_faults.py's kills and signals,
    and the Slurm and Docker tests run the real launchers. Output: every rank's stdout, then every rank's stderr.
    """
    import tempfile
    import time

    target = ["-m", "adept_ds.cli"] if str(script) == "-m" else [str(script if Path(script).is_absolute() else SCRIPTS_DIR / script)]
    command = [sys.executable, "-u", *target, *[str(arg) for arg in args]]
    port = str(free_port())
    with tempfile.TemporaryDirectory() as logs:
        ranks, files = [], []
        for rank in range(num_procs):
            variables = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_procs), LOCAL_SIZE=str(num_procs))
            variables.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CROSS_RANK="0", CROSS_SIZE="1")
            out, err = open(Path(logs) / f"{rank}.out", "w+"), open(Path(logs) / f"{rank}.err", "w+")
            files.append((out, err))
            ranks.append(subprocess.Popen(command, stdout=out, stderr=err, env=cpu_env(**variables, **env), start_new_session=True))
        deadline, returncode, timed_out = time.monotonic() + timeout, 0, False
        while any(rank.poll() is None for rank in ranks):
            failed = [rank.returncode for rank in ranks if rank.returncode not in (None, 0)]
            timed_out = time.monotonic() > deadline
            if failed or timed_out:
                returncode = failed[0] if failed else -signal.SIGKILL
                for rank in ranks:
                    if rank.poll() is None:
                        os.killpg(rank.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        for rank in ranks:
            rank.wait()
        returncode = returncode or next((rank.returncode for rank in ranks if rank.returncode != 0), 0)
        streams = []
        for index in range(2):
            text = ""
            for pair in files:
                pair[index].seek(0)
                text += pair[index].read()
                pair[index].close()
            streams.append(text)
    stdout, stderr = streams
    if timed_out:
        raise AssertionError(f"timed out after {timeout}s: {' '.join(command)}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(command, returncode, stdout, stderr)
    if check and returncode != 0:
        raise AssertionError(
            f"exit code {returncode}: {' '.join(command)}\n--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-6000:]}"
        )
    return result


def read_rank_results(directory: Path, world_size: int) -> list[dict]:
    results = [json.loads((Path(directory) / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    assert [r["rank"] for r in results] == list(range(world_size))
    return results
