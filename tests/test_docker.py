"""The Docker image for real: built on this machine (CPU, local Debian base, no registry) and trained across
two containers as two nodes, with the commands docker/README.md documents.

The engine comes from tests/docker_engine.py (docker.io installed and dockerd started when missing: a
failure to do either fails these tests, never skips them). The image is built from the repository with
Docker's layer cache, so only the first run on a machine installs torch and the dependencies.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from distributed import free_port, run_command
from docker_engine import DOCKER_ENV, docker, ensure_base_image, ensure_docker, stop_docker
from test_docker_static import setup_pins
from test_faults import assert_same_weights, logged_steps
from test_launch import losses, two_node_hostfile
from train_setup import make_training_inputs, overrides

from adept_ds.run.config import load_run_config
from adept_ds.training.checkpoints import incomplete_reason

REPO = Path(__file__).parent.parent
DOCKER = REPO / "docker"

# The pinned CPU torch for bookworm's Python 3.11, where this machine keeps it (no CUDA index is reachable here).
WHEEL = f"torch-{setup_pins()['torch']}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
LOCAL_WHEELS = Path("/opt/wheels")
IMAGE = "adept_ds:cpu"

# What the tests run, verbatim in docker/README.md (`bash -c`, from the repository root; RUNS is the host
# directory mounted as /runs, PORT a free port, NODE the node rank).
CPU_BUILD = (
    "DOCKER_BUILDKIT=0 docker build --network host -f docker/Dockerfile -t adept_ds:cpu "
    f"--build-arg BASE_IMAGE=local/debian:bookworm --build-arg TORCH_INSTALL=/opt/wheels/{WHEEL} ."
)
RUN_AS_OWNER = '--user "$(stat -c %u:%g "$RUNS")" -v "$RUNS:/runs"'
REFERENCE_RUN = (
    f"docker run --rm --name adept_ds_reference --network host --ipc host {RUN_AS_OWNER} "
    "-e DS_ACCELERATOR=cpu -e GPUS_PER_NODE=2 -e MASTER_PORT=$PORT adept_ds:cpu --config /runs/reference.yaml"
)
NODE_RUN = (
    f"docker run -d --name adept_ds_node$NODE --hostname node$NODE --network host --ipc host {RUN_AS_OWNER} "
    "-e DS_ACCELERATOR=cpu -e GLOO_SOCKET_IFNAME=lo -e NODE_RANK=$NODE -e MASTER_ADDR=127.0.0.1 -e MASTER_PORT=$PORT "
    "-e HOSTFILE=/runs/hostfile adept_ds:cpu --config /runs/two_nodes.yaml --auto-resume"
)
STOP_NODE1 = "docker stop -t 60 adept_ds_node1"
# As an unknown uid, through the entrypoint: DeepSpeed's cpu_adam JIT-built at run time (about a minute on two
# cores), then one step of it against torch's AdamW; what the container saw, as JSON.
CPU_ADAM_STEP = """
import json, os, pwd, time
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder

try:
    known_user = pwd.getpwuid(os.getuid()).pw_name
except KeyError:
    known_user = None
start = time.monotonic()
op = CPUAdamBuilder().load()
load_seconds = time.monotonic() - start
torch.manual_seed(0)
weights, grad = torch.randn(64), torch.randn(64)
params = {name: torch.nn.Parameter(weights.clone()) for name in ("deepspeed", "torch")}
optimizers = {
    "deepspeed": DeepSpeedCPUAdam([params["deepspeed"]], lr=0.1, weight_decay=0.01),
    "torch": torch.optim.AdamW([params["torch"]], lr=0.1, weight_decay=0.01),
}
for name, optimizer in optimizers.items():
    params[name].grad = grad.clone()
    optimizer.step()
print(json.dumps({
    "known_user": known_user, "home": os.environ["HOME"], "home_writable": os.access(os.environ["HOME"], os.W_OK),
    "op": op.__file__, "load_seconds": load_seconds, "difference": (params["deepspeed"] - params["torch"]).abs().max().item(),
    "moved": (params["torch"] - weights).abs().max().item(),
}))
"""
CONTAINERS = ["adept_ds_reference", "adept_ds_node0", "adept_ds_node1"]
STEPS = 10


def shell(command: str, timeout: float, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return run_command(["bash", "-c", f"cd {cwd} && {command}"], timeout=timeout, env=dict(DOCKER_ENV, **env))


def build_steps(output: str) -> list[tuple[str, bool]]:
    """(instruction, taken from the cache) for each step of a legacy `docker build`'s output."""
    return [(s.splitlines()[0], " ---> Using cache" in s) for s in re.split(r"^Step \d+/\d+ : ", output, flags=re.M)[1:]]


def put_wheel(context: Path) -> None:
    """The CPU torch wheel in the context's docker/wheels/ (git-ignored; a same-content copy keeps the cache)."""
    source, target = LOCAL_WHEELS / WHEEL, context / "docker" / "wheels" / WHEEL
    assert source.is_file(), f"the CPU image needs {source} (setup.py's torch pin for Python 3.11)"
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another file system
            shutil.copy(source, target)


# -- what needs no engine ------------------------------------------------------------------------


def test_dockerfile_takes_base_and_torch_as_arguments_and_pins_setup_pys_torch():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+\nFROM \$\{BASE_IMAGE\}$", dockerfile, re.M)  # CUDA by default
    default_torch = re.search(r'^ARG TORCH_INSTALL="(.*)"$', dockerfile, re.M).group(1)
    assert default_torch.startswith(f"torch=={setup_pins()['torch']} --index-url https://download.pytorch.org/whl/cu")
    # every other dependency comes from setup.py, so no second set of pins can drift from it
    assert re.findall(r"\b(\w+)==", dockerfile) == ["torch"]
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M)


def test_entrypoint_exists_is_executable_and_runs_train():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', dockerfile, re.M).group(1)
    local = REPO / Path(entrypoint).relative_to("/opt/adept_ds")
    assert local == DOCKER / "entrypoint.sh" and os.access(local, os.X_OK)
    text = local.read_text()
    assert "launch/train.py" in text and "launch/multinode.sh" in text and "launch/run_session.sh" in text


def test_docker_readme_shows_the_commands_these_tests_run():
    readme = (DOCKER / "README.md").read_text()
    for command in [CPU_BUILD, f"cp /opt/wheels/{WHEEL} docker/wheels/", REFERENCE_RUN, NODE_RUN, STOP_NODE1, "docker/debian-base.sh"]:
        assert command in readme, command


def test_documented_docker_commands_name_real_files():
    """Every repository path in docker/README.md and in the README's Docker commands exists."""
    docs = (DOCKER / "README.md").read_text() + (REPO / "README.md").read_text()
    commands = [c for c in re.findall(r"```bash\n(.*?)```", docs, re.S) if "docker" in c]
    assert len(commands) >= 3
    paths = set(re.findall(r"\b((?:docker|launch|ds_configs)/[\w./-]+)", "\n".join(commands)))
    assert {"docker/Dockerfile", "docker/debian-base.sh"} <= paths
    for path in paths:
        assert (REPO / path).exists(), path


# -- the image, built and run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image():
    """`adept_ds:cpu`, built as docker/README.md says, on a running engine (stopped after if we started it)."""
    daemon = ensure_docker()
    try:
        ensure_base_image()
        put_wheel(REPO)
        build = shell(CPU_BUILD, timeout=1100)
        yield build.stdout
    finally:
        stop_docker(daemon)


@pytest.mark.docker
def test_image_has_setup_pys_versions_the_cpu_torch_and_a_non_root_user(image):
    report = "import os, torch, deepspeed, transformers as t; print(torch.__version__, deepspeed.__version__, t.__version__, os.getuid())"
    versions = docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c", report, timeout=120).stdout.splitlines()[-1].split()
    pins = setup_pins()
    # +cpu: the local wheel, not replaced by a PyPI torch when the other dependencies were installed
    assert versions == [f"{pins['torch']}+cpu", pins["deepspeed"], pins["transformers"], "1000"]


@pytest.mark.docker
def test_a_source_change_rebuilds_only_the_source_layers(image, tmp_path):
    """The same context with one source file changed: every layer up to the dependencies comes from the
    cache; the build context stays small (.dockerignore keeps .venv, .git and runs/ out)."""
    sent = float(re.search(r"Sending build context to Docker daemon\s+([\d.]+)MB", image).group(1))
    assert sent < (LOCAL_WHEELS / WHEEL).stat().st_size / 1e6 + 20, f"{sent} MB build context"
    context = tmp_path / "context"
    listed = run_command(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], timeout=60).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, context / name)
    put_wheel(context)
    with open(context / "adept_ds" / "__init__.py", "a") as source:
        source.write("# changed\n")
    try:
        steps = build_steps(shell(CPU_BUILD.replace(IMAGE, "adept_ds:cache-check"), timeout=600, cwd=context).stdout)
    finally:
        docker("rmi", "adept_ds:cache-check", check=False)
    first_source = next(i for i, (instruction, _) in enumerate(steps) if instruction.startswith("COPY adept_ds/"))
    dependencies = [s for s in steps[:first_source] if s[0].startswith(("RUN", "COPY"))]
    assert any("TORCH_INSTALL" in i for i, _ in dependencies) and any("-e ." in i for i, _ in dependencies)
    assert all(cached for _, cached in dependencies), steps
    assert not steps[first_source][1], steps


def hand_to_cluster_user(runs: Path) -> None:
    """As a cluster user's own directory: an ordinary uid, one the image does not know."""
    if os.geteuid() == 0:
        for directory, _, files in os.walk(runs):
            for path in [directory, *(os.path.join(directory, f) for f in files)]:
                os.chown(path, 4242, 4242)


@pytest.mark.docker
def test_an_unknown_uid_jit_builds_a_deepspeed_op_into_the_volumes_cache_and_steps_like_torch(image, tmp_path):
    """Docker gives a uid missing from the image's /etc/passwd HOME=/: without the entrypoint, DeepSpeed's JIT
    build fails writing /.cache; through it, cpu_adam is built on the volume (/runs/cache, where a later
    container finds it) and steps as torch's AdamW does."""
    load = "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder; CPUAdamBuilder().load()"
    bypass = docker(
        "run", "--rm", "--user", "4242:4242", "--entrypoint", "python", "-e", "DS_ACCELERATOR=cpu", IMAGE, "-c", load, check=False
    )
    assert bypass.returncode != 0 and "Permission denied: '/.cache'" in bypass.stderr, bypass.stderr[-3000:]

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "cpu_adam_step.py").write_text(CPU_ADAM_STEP)
    hand_to_cluster_user(runs)
    run = f"docker run --rm {RUN_AS_OWNER} -e DS_ACCELERATOR=cpu {IMAGE} bash -c 'python /runs/cpu_adam_step.py'"
    result = shell(run, timeout=600, RUNS=str(runs))
    seen = json.loads(result.stdout.splitlines()[-1])
    print(seen)  # the build's time, for -rP
    assert seen["known_user"] is None and seen["home"] != "/" and seen["home_writable"], seen
    op = Path(seen["op"])
    assert op.name == "cpu_adam.so" and op.is_relative_to("/runs/cache/torch_extensions"), seen
    assert (runs / op.relative_to("/runs")).is_file()  # on the volume: it outlives the container
    assert seen["moved"] > 0.01 and seen["difference"] < 1e-6, seen  # a step was taken, and the same one


def logs(*containers: str) -> str:
    """Each container's whole output (what its ranks print goes to both streams)."""
    results = [docker("logs", c, check=False) for c in containers]
    return "\n".join(f"--- {c}\n{r.stdout}{r.stderr}" for c, r in zip(containers, results))


def tail(text: str) -> str:
    return "\n".join(part[-3000:] for part in text.split("\n--- "))


def start_nodes(runs: Path) -> None:
    port = str(free_port())
    for node in ("0", "1"):
        shell(NODE_RUN, timeout=60, RUNS=str(runs), PORT=port, NODE=node)


def wait_nodes(timeout: float) -> list[str]:
    """Both node containers' exit codes once they have ended."""
    result = docker("wait", *CONTAINERS[1:], timeout=timeout, check=False)
    assert result.returncode == 0, f"{result.stderr}\n{tail(logs(*CONTAINERS[1:]))}"
    return result.stdout.split()


@pytest.mark.docker
@pytest.mark.dist
def test_two_containers_train_as_two_nodes_like_one_and_resume_bit_identically_after_docker_stop(image, tmp_path):
    """One container with 2 ranks, then two containers of one rank each (`launch/multinode.sh` through the
    entrypoint, host networking, one shared volume): `docker stop` of one mid-run ends both with a complete
    checkpoint; rerun with `--auto-resume`, the job ends with the losses and weights of the one-container run."""
    runs = tmp_path / "runs"
    runs.mkdir()
    inputs = make_training_inputs(runs)
    inside = {name: Path("/runs") / path.relative_to(runs) for name, path in inputs.items()}  # as the containers see them
    for name in ("reference", "two_nodes"):
        values = {"deepspeed": "/opt/adept_ds/ds_configs/zero3.json", "train.max_steps": STEPS, "train.save_interval": 0}
        config = load_run_config(None, overrides(inside, Path("/runs") / name, **values))
        (runs / f"{name}.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    two_node_hostfile(runs)
    hand_to_cluster_user(runs)
    two_nodes = runs / "two_nodes"
    docker("rm", "-f", *CONTAINERS, check=False)  # left by an interrupted earlier run
    try:
        shell(REFERENCE_RUN, timeout=600, RUNS=str(runs), PORT=str(free_port()))
        reference = losses(runs / "reference")
        assert sorted(reference) == list(range(1, STEPS + 1))

        start_nodes(runs)
        deadline = time.monotonic() + 300
        while logged_steps(two_nodes) < 2:
            assert time.monotonic() < deadline, f"no step 2 after 300 s\n{tail(logs(*CONTAINERS[1:]))}"
            time.sleep(0.1)
        shell(STOP_NODE1, timeout=120)
        codes, output = wait_nodes(timeout=120), logs(*CONTAINERS[1:])
        assert codes == ["143", "143"], tail(output)  # both saved and stopped; 137 would be docker's SIGKILL after -t 60
        step = int(re.search(r"stopped by a peer's stop request at step (\d+)", output).group(1))  # rank 0, on node 0
        assert 2 <= step < STEPS
        checkpoint = two_nodes / "checkpoints" / f"step{step:08d}"
        assert incomplete_reason(checkpoint) is None and (checkpoint / "complete.json").is_file()
        assert (two_nodes / "checkpoints" / "latest").read_text() == checkpoint.name
        assert losses(two_nodes) == {s: reference[s] for s in range(1, step + 1)}  # two nodes train as one container
        docker("rm", *CONTAINERS[1:])

        start_nodes(runs)
        codes, output = wait_nodes(timeout=600), logs(*CONTAINERS[1:])
        assert codes == ["0", "0"], tail(output)
        assert f"resumed from /runs/two_nodes/checkpoints/{checkpoint.name}" in output
        assert losses(two_nodes) == reference
        assert_same_weights(two_nodes / "final", runs / "reference" / "final")
    finally:
        docker("rm", "-f", *CONTAINERS, check=False)
