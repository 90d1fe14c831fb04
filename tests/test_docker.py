"""What can be checked of the Docker image without a Docker engine: pins, entrypoint, documented files."""

import os
import re
from pathlib import Path

REPO = Path(__file__).parent.parent
DOCKER = REPO / "docker"


def setup_pins() -> dict[str, str]:
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


def test_dockerfile_installs_setup_pys_versions():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    installed = dict(re.findall(r"\b(torch|deepspeed|transformers)==(\S+)", dockerfile))
    pins = setup_pins()
    assert installed.keys() == {"torch", "deepspeed", "transformers"}
    assert installed == {name: pins[name] for name in installed}
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.M)  # a CUDA base image
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M)  # not root
    assert "pip install -e ." in dockerfile


def test_entrypoint_exists_is_executable_and_runs_train():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', dockerfile, re.M).group(1)
    local = REPO / Path(entrypoint).relative_to("/opt/adept_ds")
    assert local == DOCKER / "entrypoint.sh" and os.access(local, os.X_OK)
    text = local.read_text()
    assert "launch/train.py" in text and "launch/multinode.sh" in text


def test_documented_docker_commands_name_real_files():
    """Every repository path in docker/README.md and in the README's Docker commands exists."""
    docs = (DOCKER / "README.md").read_text() + (REPO / "README.md").read_text()
    commands = [c for c in re.findall(r"```bash\n(.*?)```", docs, re.S) if "docker " in c]
    assert len(commands) >= 3
    paths = set(re.findall(r"\b((?:docker|launch|ds_configs)/[\w./-]+)", "\n".join(commands)))
    assert {"docker/Dockerfile", "launch/configs/demo_adept.yaml"} <= paths
    for path in paths:
        assert (REPO / path).exists(), path
