"""Cluster software for the launch tests: Debian packages installed on demand, and a real one-node Slurm.

`ensure_packages` installs what a test needs with apt when its binary is missing and fails loudly
(never skips) when it cannot. `SlurmCluster` starts munged, slurmctld and slurmd under a temp dir as
root without systemd (facts: ../shared/notes/slurm-one-node.md) and stops them by their pid files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed import cpu_env, free_port, run_command

APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
OPEN_MPI = {"mpirun": "openmpi-bin", "mpicc": "libopenmpi-dev"}  # mpi4py loads the unversioned libmpi.so of -dev
BIN = Path(sys.executable).parent  # deepspeed, torchrun and adept-ds of this environment
LAUNCHERS = ("deepspeed", "deepspeed --no_local_rank", "torchrun", "mpirun")


def ensure_packages(binaries: dict[str, str]) -> None:
    """`binaries` maps a command to the Debian package that provides it; install the missing ones."""
    missing = sorted({package for binary, package in binaries.items() if shutil.which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise AssertionError(f"these tests need {missing} and cannot install them (needs root and apt-get)")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if run_command(install, timeout=600, env=APT_ENV, check=False).returncode != 0:
        run_command(["apt-get", "update"], timeout=600, env=APT_ENV)
        run_command(install, timeout=600, env=APT_ENV)
    still_missing = [binary for binary in binaries if shutil.which(binary) is None]
    assert not still_missing, f"installed {missing} but {still_missing} are still not on PATH"


SLURM_PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}


class SlurmCluster:
    """A real Slurm on this machine for `sbatch` submissions; clients need `self.env`.

    One node by default, this machine as `slurmd -C` describes it. With `nodes=N`, N slurmd daemons run here as
    nodes n1..nN, each this machine's CPUs (`slurmd -N`, each with its own port, spool, pid and log), so that a job
    can span nodes and be requeued onto fewer of them; their names do not resolve (give jobs MASTER_ADDR).

    Every node has GPUS fake GPUs (empty files as devices: Slurm 22.05 drops a GPU without a File=), so that jobs
    may ask for `--gpus-per-node` and get SLURM_GPUS_ON_NODE. Tasks are bound to their CPUs (task/affinity, by
    core) as on a production cluster: a step's task gets only the CPUs it asks for (one by default)."""

    GPUS = 8

    def __init__(self, root: Path, nodes: int = 1):
        self.nodes = nodes
        ensure_packages(SLURM_PACKAGES)
        self.root = root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # munged wants every directory above its socket open to all (pytest's temp dirs are 700).
        self.socket_dir = Path(tempfile.mkdtemp(prefix="adept_ds_munge."))
        self.socket_dir.chmod(0o755)
        self.socket = self.socket_dir / "munge.socket"
        self.conf = root / "slurm.conf"
        self.conf.write_text(self._slurm_conf())
        (root / "dev").mkdir(exist_ok=True)
        for i in range(self.GPUS):
            (root / "dev" / f"nvidia{i}").touch()
        # gres.conf sits beside slurm.conf, where the daemons look for it
        (root / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={root / 'dev'}/nvidia[0-{self.GPUS - 1}]\n")
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        names = ["slurmd"] if nodes == 1 else [f"slurmd.n{i}" for i in range(1, nodes + 1)]
        self.pid_files = [root / "munged.pid", root / "slurmctld.pid", *[root / f"{name}.pid" for name in names]]

    def _slurm_conf(self) -> str:
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()[0]
        r, host = self.root, socket.gethostname().split(".")[0]
        gres = f"Gres=gpu:{self.GPUS}"
        if self.nodes == 1:
            node_lines, node_names = [f"{node} NodeAddr=127.0.0.1 {gres} State=UNKNOWN"], node.split()[0].split("=")[1]
            daemon_paths = [r / "slurmd.pid", r / "spool", r / "log" / "slurmd.log"]
        else:  # %n: the node's name, so that the daemons keep apart
            # Each node is this machine's CPUs: bound to a 1-CPU node's CPU 0, every node's ranks would share one core.
            hardware = node.split(maxsplit=1)[1]
            node_lines = [
                f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} {hardware} {gres} State=UNKNOWN"
                for i in range(1, self.nodes + 1)
            ]
            node_names, daemon_paths = f"n[1-{self.nodes}]", [r / "slurmd.%n.pid", r / "spool" / "%n", r / "log" / "slurmd.%n.log"]
            for i in range(1, self.nodes + 1):
                (r / "spool" / f"n{i}").mkdir(parents=True, exist_ok=True)
        return "\n".join(
            [
                "ClusterName=adepttest",
                f"SlurmctldHost={host}(127.0.0.1)",
                # cred_expire: a requeued job may start again this many seconds after it ended (default 120)
                f"AuthInfo=socket={self.socket},cred_expire=5",
                "SlurmUser=root",
                f"StateSaveLocation={r / 'state'}",
                *[f"{key}={path}" for key, path in zip(["SlurmdPidFile", "SlurmdSpoolDir", "SlurmdLogFile"], daemon_paths)],
                f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/affinity",  # sched_setaffinity: no cgroups needed
                "TaskPluginParam=Cores",  # bind each task to its cores (task/affinity alone left a 1-CPU step on all)
                "GresTypes=gpu",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "MailProg=/bin/true",
                "SchedulerParameters=sched_interval=1",  # a requeued job starts again within seconds, not a minute
                "ReturnToService=2",
                "EnforcePartLimits=ALL",
                "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` (no accounting DB here)
                *node_lines,
                f"PartitionName=test Nodes={node_names} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def start(self) -> SlurmCluster:
        key = self.root / "munge" / "munge.key"
        run_command(["mungekey", "--create", f"--keyfile={key}"], timeout=60, env=self.env)
        key.chmod(0o600)
        munge = self.root / "munge"
        run_command(
            ["munged", f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={self.pid_files[0]}",
             f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
            timeout=60, env=self.env,
        )  # fmt: skip
        run_command(["slurmctld", "-f", str(self.conf)], timeout=60, env=self.env)
        for node in [[]] if self.nodes == 1 else [["-N", f"n{i}"] for i in range(1, self.nodes + 1)]:
            run_command(["slurmd", "-f", str(self.conf), *node], timeout=60, env=self.env)
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split() != ["idle"]:
            assert time.monotonic() < deadline, f"Slurm did not come up:\n{self.logs()}"
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        # Jobs first: a job still running when its slurmd goes (a failed test's) would leave its steps behind.
        self.run("scancel", "--user", "root", "--full", check=False)
        deadline = time.monotonic() + 30
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid_file in reversed(self.pid_files):
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def run(self, *command: str, check: bool = True, timeout: float = 60):
        return run_command(list(command), timeout=timeout, env=self.env, check=check)

    def submit(self, *args: str, env: dict[str, str]) -> str:
        """`sbatch --parsable args...` with the caller's environment; returns the job id."""
        out = run_command(["sbatch", "--parsable", *args], timeout=60, env={**env, "SLURM_CONF": str(self.conf)})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job has ended (or `until(job)` holds); fail with its output on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job) if until else job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                return job
            if time.monotonic() > deadline:
                output = Path(job.get("StdOut", "")).read_text() if Path(job.get("StdOut", "/")).is_file() else ""
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout}s\n{output[-4000:]}\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*.log")))


def run_together(commands: list[list[str]], timeout: float, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Start several launchers at once (say, one per "node"), wait for all, kill every one on timeout."""
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) for c in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for command, process in zip(commands, processes):
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        results = None
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    outputs = [(p.args, *p.communicate()) for p in processes] if results is None else [(r.args, r.stdout, r.stderr) for r in results]
    failed = results is None or any(r.returncode != 0 for r in results)
    assert not failed, "\n".join(
        f"{'timed out' if results is None else f'exit {results[i].returncode}'}: {' '.join(args)}\n{out[-3000:]}\n{err[-4000:]}"
        for i, (args, out, err) in enumerate(outputs)
    )
    return results


def launcher_env(**extra: str) -> dict[str, str]:
    """A user's shell for a launcher: this environment's bin first on PATH, CPU ranks."""
    return cpu_env(**{"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra})


def run_launched(launcher: str, target: list, num_procs: int = 2, timeout: float = 600, cwd=None, **env: str):
    """`target` (a script and its arguments, or ["-m", module, arguments...]) as `num_procs` ranks on this
    machine, started by the real `launcher` (one of LAUNCHERS) with the options the README gives it."""
    target, port, ranks = [str(arg) for arg in target], str(free_port()), str(num_procs)
    if launcher.startswith("deepspeed"):
        no_local_rank = ["--no_local_rank"] if launcher.endswith("--no_local_rank") else []
        module = ["--module", *target[1:]] if target[0] == "-m" else target
        command = [f"{BIN}/deepspeed", *no_local_rank, "--num_gpus", ranks, "--master_port", port, *module]
    elif launcher == "torchrun":
        command = [f"{BIN}/torchrun", "--nnodes", "1", "--nproc_per_node", ranks, "--master_addr", "127.0.0.1", "--master_port", port]
        command += target
    elif launcher == "mpirun":
        ensure_packages(OPEN_MPI)
        command = ["mpirun", "--allow-run-as-root", "-np", ranks, "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}"]
        command += [sys.executable, *target]
    else:
        raise ValueError(f"unknown launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    return run_command(command, timeout=timeout, env=launcher_env(**env), cwd=cwd)
