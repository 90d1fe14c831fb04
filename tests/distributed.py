"""Launching real multi-process DeepSpeed runs on CPU (gloo) from tests.

`run_deepspeed(script, ...)` starts `deepspeed --num_gpus N script ...` with the CPU accelerator,
kills the whole process group on timeout (a hung collective must fail the test, not CI), and
raises with the tail of both output streams when any rank fails. Scripts report results by
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
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


def run_command(command: list[str], timeout: float, env: dict[str, str] | None = None, check: bool = True):
    """Run a launcher command in its own process group; on timeout kill the group and fail loudly."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cpu_env(), start_new_session=True
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
    """`deepspeed --num_gpus num_procs script args` on CPU; `script` is a path, a name in tests/scripts,
    or "-m" for the `adept-ds` command line (`adept_ds.cli`)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher), "--no_local_rank", "--num_gpus", str(num_procs), "--master_port", str(free_port())]
    if str(script) == "-m":  # run_deepspeed("-m", "eval", ...) runs the adept-ds command line on every rank
        command += ["--module", "adept_ds.cli"]
    else:
        script = Path(script)
        command.append(str(script if script.is_absolute() else SCRIPTS_DIR / script))
    command += [str(arg) for arg in args]
    return run_command(command, timeout, cpu_env(**env), check=check)


def read_rank_results(directory: Path, world_size: int) -> list[dict]:
    results = [json.loads((Path(directory) / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    assert [r["rank"] for r in results] == list(range(world_size))
    return results
