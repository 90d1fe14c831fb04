"""The Docker images' Python against setup.py, with no engine: the default GPU base and the tests' CPU base
must have a Python that setup.py's python_requires admits, and python_requires must be the highest
Requires-Python of the exact pins (as installed here), so a base too old for a pin fails here, not in a build.
"""

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).parent.parent
DOCKER = REPO / "docker"

# The Python 3 of each base's distribution (its `python3` package), by the name in the image's tag:
#   ubuntu22.04 (jammy): https://packages.ubuntu.com/jammy/python3 (3.10)
#   ubuntu24.04 (noble): https://packages.ubuntu.com/noble/python3 (3.12)
#   Debian 12 (bookworm): https://packages.debian.org/bookworm/python3 (3.11)
BASE_PYTHONS = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12", "bookworm": "3.11"}


def setup_pins() -> dict[str, str]:
    """setup.py's exact pins (`name==version`), its extras' included."""
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (REPO / "setup.py").read_text()))


def python_requires() -> SpecifierSet:
    return SpecifierSet(re.search(r'python_requires="([^"]+)"', (REPO / "setup.py").read_text()).group(1))


def base_python(image: str) -> Version:
    known = [name for name in BASE_PYTHONS if name in image]
    assert len(known) == 1, f"{image}: add its distribution and Python to BASE_PYTHONS in {Path(__file__).name}"
    return Version(BASE_PYTHONS[known[0]])


def python_floor(specifiers: SpecifierSet) -> Version:
    """The lowest Python a Requires-Python admits (its `>=`), 0 where it names none."""
    return max((Version(s.version) for s in specifiers if s.operator == ">="), default=Version("0"))


def test_python_requires_is_the_highest_requires_python_of_the_pins():
    floors = {}
    for name, version in setup_pins().items():
        installed = importlib.metadata.distribution(name)
        # the pin's own metadata, not another version's (torch's +cpu local version is the same release)
        assert installed.version in SpecifierSet(f"=={version}"), (name, installed.version, version)
        floors[name] = python_floor(SpecifierSet(installed.metadata.get("Requires-Python") or ""))
    needs = ", ".join(f"{name} >={floor}" for name, floor in floors.items())
    assert python_floor(python_requires()) == max(floors.values()), f"python_requires={python_requires()}; the pins need {needs}"


def test_the_default_gpu_base_has_a_python_setup_py_admits():
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", (DOCKER / "Dockerfile").read_text(), re.M).group(1)
    assert base_python(default) in python_requires(), f"{default} has Python {base_python(default)}; setup.py: {python_requires()}"


def test_the_tests_cpu_base_and_torch_wheel_match_a_python_setup_py_admits():
    """The CPU build docker/README.md shows (and tests/test_docker.py runs verbatim): its base's Python, the
    Python of its torch wheel, and python_requires agree."""
    build = re.search(r"^DOCKER_BUILDKIT=0 docker build .*$", (DOCKER / "README.md").read_text(), re.M).group(0)
    base = re.search(r"--build-arg BASE_IMAGE=(\S+)", build).group(1)
    wheel_python = re.search(r"--build-arg TORCH_INSTALL=\S+-cp(\d)(\d+)-", build).groups()
    assert base_python(base) == Version(".".join(wheel_python)), build
    assert base_python(base) in python_requires(), f"{base} has Python {base_python(base)}; setup.py: {python_requires()}"


def test_a_base_missing_from_the_table_fails_saying_to_add_it():
    with pytest.raises(AssertionError, match="add its distribution and Python to BASE_PYTHONS"):
        base_python("nvidia/cuda:12.8.1-cudnn-devel-rockylinux9")
