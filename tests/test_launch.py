"""Every way README's "Running on a cluster" starts training, for real on this machine (CPU, gloo, loopback).

Each launcher trains the same tiny ZeRO-3 run with 2 ranks; its losses and exported weights must agree
with a plain one-node `deepspeed --num_gpus 2` run. Open MPI and Slurm come from Debian (installed by
the test setup when missing); the Slurm jobs go through `sbatch` to a real one-node Slurm.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cluster import BIN, OPEN_MPI, SlurmCluster, ensure_packages, launcher_env, run_together
from distributed import free_port, run_command
from model_checks import load_state
from train_setup import REPO, make_training_inputs, overrides

from adept_ds.run.config import load_run_config
from adept_ds.runtime.run_log import read_records

pytestmark = pytest.mark.dist

TRAIN = str(REPO / "launch" / "train.py")


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_records(run_dir, "train")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Training inputs and a factory of run configs (one output_dir each), as users write them."""
    root = tmp_path_factory.mktemp("launch")
    inputs = make_training_inputs(root)

    def run_config(name: str, **extra) -> tuple[Path, Path]:
        output = root / name
        values = {"train.max_steps": 3, "train.save_interval": 0, **extra}
        config = load_run_config(None, overrides(inputs, output, **values))
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return path, output

    return root, run_config


@pytest.fixture(scope="module")
def reference(setup):
    """The one-node, two-rank run every other launcher must reproduce."""
    _, run_config = setup
    config, output = run_config("reference")
    run_command([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, "--config", str(config)],
                timeout=300, env=launcher_env())  # fmt: skip
    return output


def assert_same_training(run_dir: Path, reference: Path) -> None:
    expected = losses(reference)
    assert sorted(expected) == [1, 2, 3]
    assert losses(run_dir) == pytest.approx(expected, rel=1e-5)
    final, wanted = load_state(run_dir / "final"), load_state(reference / "final")
    assert final.keys() == wanted.keys()
    for name, tensor in wanted.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def two_node_hostfile(directory: Path) -> Path:
    hostfile = directory / "hostfile"
    hostfile.write_text("# two 'nodes' on this machine; the names are never resolved\nnode0 slots=1\nnode1 slots=1\n")
    return hostfile


def test_two_nodes_without_ssh_match_one_node(setup, reference):
    """README: `launch/multinode.sh HOSTFILE NODE_RANK MASTER_ADDR MASTER_PORT --config ...` on each node."""
    root, run_config = setup
    config, output = run_config("no_ssh")
    hostfile, port = two_node_hostfile(root), str(free_port())
    run_together(
        [[str(REPO / "launch" / "multinode.sh"), str(hostfile), str(rank), "127.0.0.1", port, "--config", str(config)] for rank in (0, 1)],
        timeout=300,
        env=launcher_env(),
    )
    assert_same_training(output, reference)


def test_hostfile_over_ssh_matches_one_node(setup, reference, tmp_path):
    """README: `deepspeed --hostfile HOSTFILE --master_addr ... launch/train.py ...` (pdsh + ssh to each host).

    Both hosts are this machine: an `ssh` first on PATH runs the remote command here, so the runner,
    pdsh and DeepSpeed's per-node launch (node rank from pdsh's %n) are real; only the network hop is not.
    """
    ensure_packages({"pdsh": "pdsh"})
    root, run_config = setup
    config, output = run_config("hostfile_ssh")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ssh").write_text(
        '#!/usr/bin/env bash\n# ssh [options] HOST COMMAND...: run COMMAND here\nwhile [[ $1 == -* ]]; do [[ $1 == -[lpoi] ]] && shift; shift; done\nshift\nexec bash -c "$*"\n'
    )
    (shim / "ssh").chmod(0o755)
    env = launcher_env(PATH=f"{shim}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}")  # our ssh first
    command = [f"{BIN}/deepspeed", "--hostfile", str(two_node_hostfile(tmp_path)), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), TRAIN, "--config", str(config)]  # fmt: skip
    run_command(command, timeout=300, env=env)
    assert_same_training(output, reference)


def test_mpirun_matches_one_node(setup, reference):
    """README: `mpirun -np 2 -x MASTER_ADDR=... -x MASTER_PORT=... python launch/train.py --config ...`."""
    ensure_packages(OPEN_MPI)
    _, run_config = setup
    config, output = run_config("mpirun")
    command = ["mpirun", "--allow-run-as-root", "-np", "2", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}",
               sys.executable, TRAIN, "--config", str(config)]  # fmt: skip
    run_command(command, timeout=300, env=launcher_env())
    assert_same_training(output, reference)


def test_mpi4py_discovers_ranks_and_master_when_mpirun_sets_nothing_we_know(tmp_path):
    """Under mpirun with Open MPI's rank variables and MASTER_* removed, mpi4py finds ranks and local
    ranks, and rank 0's loopback address and a free port (not DeepSpeed's 29500) reach every rank."""
    ensure_packages(OPEN_MPI)
    command = ["mpirun", "--allow-run-as-root", "-np", "2", sys.executable, str(REPO / "tests" / "scripts" / "discover.py"), str(tmp_path)]
    run_command(command, timeout=120, env=launcher_env())
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["env"]["RANK"] for r in results] == ["0", "1"]
    assert [r["env"]["LOCAL_RANK"] for r in results] == ["0", "1"]
    assert all(r["env"]["WORLD_SIZE"] == "2" and r["env"]["LOCAL_WORLD_SIZE"] == "2" for r in results)
    assert {r["env"]["MASTER_ADDR"] for r in results} == {"127.0.0.1"}
    assert len({r["env"]["MASTER_PORT"] for r in results}) == 1 and results[0]["env"]["MASTER_PORT"] != "29500"
    assert all(r["used_mpi4py"] and r["all_reduce"] == 1.0 for r in results)  # the process group works: 0 + 1


def test_torchrun_matches_one_node(setup, reference):
    """README: `torchrun --nnodes 1 --nproc_per_node 2 launch/train.py --config ...`."""
    _, run_config = setup
    config, output = run_config("torchrun")
    command = [f"{BIN}/torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), TRAIN, "--config", str(config)]  # fmt: skip
    run_command(command, timeout=300, env=launcher_env())
    assert_same_training(output, reference)


@pytest.mark.parametrize(
    "launcher, expected",
    [
        (
            {
                "OMPI_COMM_WORLD_RANK": "5",
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
            },
            ("5", "8", "1", "4"),
        ),
        ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, ("3", "4", "1", "2")),
        ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2"}, ("2", "4", "0", "2")),  # deepspeed launcher
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, ("1", "2", "1", "2")),  # torchrun
    ],
    ids=["openmpi", "mpich", "deepspeed", "torchrun"],
)
def test_discover_ranks_reads_every_launchers_names(monkeypatch, launcher, expected):
    from adept_ds.runtime.distributed import discover_ranks

    for name in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**launcher, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31234"}.items():
        monkeypatch.setenv(name, value)
    discover_ranks()
    assert tuple(os.environ[n] for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")) == expected
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.2.3", "31234")  # given: never guessed


# ---------------------------------------------------------------------------------------------
# Slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def sbatch(slurm: SlurmCluster, options: str, script: str, log: Path, *args: str, ranks_per_node: int = 2, **env: str) -> str:
    """`sbatch OPTIONS launch/slurm/SCRIPT args` from the repository root, as README says, 2 CPU ranks per node."""
    env = launcher_env(GPUS_PER_NODE=str(ranks_per_node), MASTER_PORT=str(free_port()), SLURM_CONF=str(slurm.conf), **env)
    command = f"cd {REPO} && sbatch --parsable --output={log} {options} launch/slurm/{script} " + " ".join(args)
    return run_command(["bash", "-c", command], timeout=60, env=env).stdout.strip().split(";")[0]


@pytest.mark.parametrize(
    "options, script",
    [("", "train_1node.sbatch"), ("--nodes=1", "train_multinode.sbatch")],  # the multi-node script on the one node here
    ids=["1node", "multinode"],
)
def test_slurm_job_matches_one_node(setup, reference, slurm, options, script):
    """README: `sbatch [--nodes=N] launch/slurm/SCRIPT --config ...` runs to completion and trains the same."""
    root, run_config = setup
    config, output = run_config(f"slurm_{script}")
    job_id = sbatch(slurm, options, script, root / f"{script}.log", "--config", str(config))
    job = slurm.wait(job_id, timeout=300)
    log = (root / f"{script}.log").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert "node 0 of 1" in log and "exported" in log
    # The scripts' GPU request reaches node.sh (GPUS_PER_NODE=2 still sets the ranks), and the step and its ranks
    # get every CPU the job was granted: under task binding an srun without --cpus-per-task gets one.
    granted = job["NumCPUs"]
    assert f"2 GPUs (ranks) from GPUS_PER_NODE (SLURM_GPUS_ON_NODE={SlurmCluster.GPUS}), {granted} CPUs" in log, log
    assert re.findall(r"cpus: (\d+) usable \(affinity\)", log) == [granted], log
    assert_same_training(output, reference)


def test_slurm_node_script_derives_ranks_master_and_port_on_four_nodes(setup, slurm, tmp_path):
    """What launch/slurm/node.sh starts on each of 4 nodes, from the variables Slurm sets there."""
    root, run_config = setup
    config, _ = run_config("unused")
    commands = []
    for node_id in range(4):
        env = launcher_env(SLURM_CONF=str(slurm.conf), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-09],big01",
                         SLURM_NODEID=str(node_id), SLURM_GPUS_ON_NODE="8", TMPDIR=str(tmp_path), ADEPT_DS_DRY_RUN="1")  # fmt: skip
        for name in ("MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE"):
            env.pop(name, None)
        out = run_command(
            ["bash", str(REPO / "launch" / "slurm" / "node.sh"), "--config", str(config), "--auto-resume"], timeout=60, env=env
        )
        commands.append(next(line.split() for line in out.stdout.splitlines() if line.startswith("deepspeed ")))
        check = next(line.split() for line in out.stdout.splitlines() if line.startswith("adept-ds check"))
        assert "--auto-resume" not in check and ["--config", str(config)] == check[-2:]
        assert f"8 GPUs (ranks) from SLURM_GPUS_ON_NODE (SLURM_GPUS_ON_NODE=8), {len(os.sched_getaffinity(0))} CPUs" in out.stdout
    for node_id, command in enumerate(commands):
        flag = lambda name: command[command.index(name) + 1]  # noqa: E731
        assert command[:3] == ["deepspeed", "--hostfile", flag("--hostfile")] and "--no_ssh" in command
        assert (flag("--node_rank"), flag("--num_nodes")) == (str(node_id), "4")
        assert (flag("--master_addr"), flag("--master_port")) == ("gpu07", str(20000 + 4242))
        assert Path(flag("--hostfile")).read_text() == "gpu07 slots=8\ngpu08 slots=8\ngpu09 slots=8\nbig01 slots=8\n"
        assert command[command.index(TRAIN) :] == [TRAIN, "--config", str(config), "--auto-resume"]
    # Without GPUS_PER_NODE or a Slurm GPU request: the GPUs nvidia-smi lists.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: fake"; done\n')
    (fake / "nvidia-smi").chmod(0o755)
    env.update(SLURM_NODEID="0", PATH=f"{fake}{os.pathsep}{env['PATH']}")
    env.pop("SLURM_GPUS_ON_NODE")
    out = run_command(["bash", str(REPO / "launch" / "slurm" / "node.sh"), "--config", str(config)], timeout=60, env=env).stdout
    assert "4 GPUs (ranks) from nvidia-smi (SLURM_GPUS_ON_NODE=unset)" in out
    assert (tmp_path / "adept_ds.4242.0.hostfile").read_text() == "gpu07 slots=4\ngpu08 slots=4\ngpu09 slots=4\nbig01 slots=4\n"


def test_slurm_job_requeues_on_sigterm_and_resumes(setup, slurm):
    """SIGTERM to the batch shell (what `--signal=B:TERM@300` sends ahead of the time limit): the ranks save
    a checkpoint, the job requeues itself, and its rerun continues from that checkpoint to the end."""
    root, run_config = setup
    config, output = run_config("slurm_requeue", **{"train.max_steps": 10, "train.save_interval": 0})
    log = root / "slurm_requeue.log"
    job_id = sbatch(slurm, "", "train_1node.sbatch", log, "--config", str(config))
    slurm.wait(job_id, timeout=180, until=lambda job: (output / "metrics.jsonl").is_file() and len(losses(output)) >= 2)
    slurm.run("scancel", "--batch", "--signal=TERM", job_id)
    job = slurm.wait(job_id, timeout=300, until=lambda job: job["JobState"] == "COMPLETED" or job["JobState"] == "FAILED")
    text = log.read_text()  # both runs' output: the scripts append (--open-mode=append)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text
    assert "requeueing job" in text and text.count("node 0 of 1") == 2
    resumed_at = int(re.search(r"resumed from \S+ \(the newest complete checkpoint\) at step (\d+)", text).group(1))
    assert 2 <= resumed_at < 10  # the checkpoint the stopped run saved, not a fresh start or the end
    assert [m["step"] for m in read_records(output, "train")] == list(range(1, 11))


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm_two_nodes"), nodes=2).start()
    yield cluster
    cluster.stop()


def test_slurm_job_requeued_onto_fewer_nodes_continues_by_itself(setup, slurm_two_nodes):
    """A 2-node job (one rank per node) is preempted while one of its nodes is drained; requeued, it waits for
    2 nodes until it is allowed 1 (`scontrol update JobId=... NumNodes=1-1 ...`, as an admin or a requeue hook would).
    The rerun, on 1 rank, continues the 2-rank checkpoint by itself (`--auto-resume` converts it to a universal
    checkpoint and keeps the global batch) to the end."""
    slurm = slurm_two_nodes
    root, run_config = setup
    config, output = run_config("slurm_fewer_nodes", **{"train.max_steps": 8, "train.save_interval": 0})
    log = root / "slurm_fewer_nodes.log"
    # The nodes' names (n1, n2) do not resolve: the rendezvous is on this machine's loopback.
    job_id = sbatch(slurm, "--nodes=2", "train_multinode.sbatch", log, "--config", str(config), ranks_per_node=1, MASTER_ADDR="127.0.0.1")
    slurm.wait(job_id, timeout=240, until=lambda job: (output / "metrics.jsonl").is_file() and len(losses(output)) >= 2)
    slurm.run("scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=adept_ds-test")
    slurm.run("scancel", "--batch", "--signal=TERM", job_id)
    slurm.wait(job_id, timeout=240, until=lambda job: job["Restarts"] == "1" and job["JobState"] == "PENDING")
    slurm.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1-1", "NumTasks=1", "NumCPUs=1")  # NumNodes alone keeps 2 tasks
    job = slurm.wait(job_id, timeout=400, until=lambda job: job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"))
    text = log.read_text()  # both runs' output (--open-mode=append)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["NumNodes"] == "1", text[-6000:]
    assert "node 0 of 2" in text and "node 1 of 2" in text and "node 0 of 1" in text
    assert "was written by 2 ranks, this run has 1: converting it to a universal checkpoint" in text
    assert "resume on 1 ranks: global batch 4 = micro 2 x accumulation 2 x 1 ranks" in text  # the global batch kept
    resumed_at = int(re.search(r"resumed from \S+ \(the newest complete checkpoint\) at step (\d+)", text).group(1))
    assert 2 <= resumed_at < 8
    assert [m["step"] for m in read_records(output, "train")] == list(range(1, 9))
