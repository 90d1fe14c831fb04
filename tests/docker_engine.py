"""A Docker engine for tests, with no registry: Debian's docker.io daemon and a debootstrap base image.

`ensure_docker` installs docker.io and debootstrap when missing and starts dockerd by hand (no systemd)
when its socket does not answer; `ensure_base_image` builds `local/debian:bookworm` with
docker/debian-base.sh once per machine (cached by tag). Both fail loudly, never skip.
Facts: ../shared/notes/docker-here.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from cluster import APT_ENV, ensure_packages
from distributed import REPO_DIR, run_command

# /usr/local/bin/docker may be a CLI with no engine behind it: dockerd is what docker.io brings.
DOCKER_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
BASE_IMAGE = "local/debian:bookworm"
DOCKERD_LOG = Path("/var/log/dockerd.log")
# The legacy builder (no buildx here, and the same output where there is): the tests read its
# "Step N/M" and "Using cache" lines.
DOCKER_ENV = dict(os.environ, DOCKER_BUILDKIT="0")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run_command(["docker", *args], timeout=timeout, env=DOCKER_ENV, check=check)


def engine_answers() -> bool:
    return docker("version", "--format", "{{.Server.Version}}", timeout=30, check=False).returncode == 0


def ensure_docker() -> subprocess.Popen | None:
    """A running engine; returns the dockerd this call started (None if one already answered)."""
    ensure_packages(DOCKER_PACKAGES)
    if engine_answers():
        return None
    with open(DOCKERD_LOG, "ab") as log:
        daemon = subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while not engine_answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            tail = DOCKERD_LOG.read_text(errors="replace")[-3000:]
            raise AssertionError(f"dockerd did not start (exit {daemon.poll()}); {DOCKERD_LOG}:\n{tail}")
        time.sleep(0.3)
    return daemon


def stop_docker(daemon: subprocess.Popen | None) -> None:
    """Stop the dockerd that `ensure_docker` started, by its pid; images and build cache stay on disk."""
    if daemon is None or daemon.poll() is not None:
        return
    daemon.terminate()
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()


def debian_mirror() -> str:
    """The Debian mirror of this host's apt sources (deb822 `URIs:` or one-line `deb URI bookworm`)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if path.is_file() and path.suffix in (".list", ".sources"):
            text = path.read_text()
            uris = re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M)
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):  # not debian-security, not a third-party repository
                    return uri
    raise AssertionError(f"no Debian mirror in {[str(p) for p in sources]}: cannot debootstrap {BASE_IMAGE}")


def ensure_base_image() -> str:
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        script = REPO_DIR / "docker" / "debian-base.sh"
        run_command([str(script), debian_mirror(), BASE_IMAGE], timeout=900, env=dict(DOCKER_ENV, **APT_ENV))
    return BASE_IMAGE
