import os

import pytest

# Quiet, deterministic CPU runs: DeepSpeed picks the CPU accelerator, tokenizers stay single-threaded.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")


@pytest.fixture(scope="session")
def demo_model_dir():
    """The real offline demo model (SmolLM2-135M), built once per machine into the cache."""
    from adept_ds.model.demo_model import fetch_demo_model

    return fetch_demo_model()


@pytest.fixture(autouse=True)
def _restore_environment():
    """Code under test sets launcher variables (RANK, WORLD_SIZE, MASTER_PORT, ...) in os.environ, as a
    real rank must; left behind, they would make a later in-process run wait for peers forever."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
