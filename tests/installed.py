"""adept_ds installed as a user installs it: `pip install .` (not editable) into a fresh venv, used from elsewhere.

`install_package(root)` copies the checkout (as a clone would have it), makes a venv and installs the package
into it without its dependencies. Those come from the test environment through a `.pth` line, so the install
takes seconds instead of downloading torch again. A path added by a `.pth` line is not a site directory: the
test environment's own `.pth` files, among them the editable install's finder that maps `adept_ds` to this
checkout, are not run, so `import adept_ds` finds only the installed copy. DeepSpeed's `deepspeed` launcher
script is written into the venv as pip writes it (its three lines, with the venv's interpreter), so that the
ranks it starts run the venv's Python too.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from distributed import HIDDEN_DIR, REPO_DIR, cpu_env, run_command

NOT_SHIPPED = (".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "wheels", "work")


def install_package(root: Path) -> Path:
    """A venv under `root` with adept_ds installed from a copy of the checkout; returns its bin directory."""
    source, venv = root / "source", root / "venv"
    shutil.copytree(REPO_DIR, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    run_command([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    purelib = run_command([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60).stdout.strip()
    Path(purelib, "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)]
    run_command(install, timeout=300, env=cpu_env(PIP_NO_INDEX="1"))
    launcher = venv / "bin" / "deepspeed"
    launcher.write_text(f"#!{python}\nfrom deepspeed.launcher.runner import main\n\nif __name__ == '__main__':\n    main()\n")
    launcher.chmod(0o755)
    found = run_command([str(python), "-c", "import adept_ds; print(adept_ds.__file__)"], timeout=60, cwd=root).stdout.strip()
    assert Path(found).is_relative_to(venv), f"adept_ds imports from {found}, not the venv {venv}"
    return venv / "bin"


def user_env(bin_dir: Path, home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: the venv first on PATH, a home of their own, CPU ranks (no GPU here), and no MLflow, as the
    README's install (`pip install -e .`, no `[mlflow]` extra) leaves it; the tests' own install has it."""
    home.mkdir(parents=True, exist_ok=True)
    env = cpu_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(home), **extra)
    env["PYTHONPATH"] = str(HIDDEN_DIR)  # not the tests' helpers: only the stand-in that hides MLflow (tests/hidden)
    return env
