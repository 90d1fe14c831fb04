import sys
from pathlib import Path

import pytest
import torch
from distributed import free_port, read_rank_results, run_command, run_deepspeed
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from adept_ds.runtime.distributed import decided_by_rank_zero, init_distributed, shutdown_distributed


@pytest.mark.dist
def test_two_rank_zero3_run_matches_single_process_training(tmp_path):
    """The shared launcher helper runs real DeepSpeed ZeRO-3 on 2 CPU ranks: weights are partitioned on
    load, and the losses of 3 steps on a fixed batch match plain single-process SGD.

    It also runs on plain gloo: DeepSpeed's shared-memory all-reduce op is neither compiled (minutes
    on a fresh machine) nor left behind in /dev/shm (69 MB per rank per run, never unlinked)."""
    model_dir = make_tiny_model(tmp_path / "model", "llama", num_layers=2)
    shm_before = set(Path("/dev/shm").glob("deepspeed*"))
    extensions_dir = tmp_path / "torch_extensions"
    run_deepspeed("zero3_smoke.py", model_dir, tmp_path, timeout=600, TORCH_EXTENSIONS_DIR=str(extensions_dir))
    assert set(Path("/dev/shm").glob("deepspeed*")) <= shm_before
    assert not extensions_dir.exists() or not any(extensions_dir.rglob("*.so"))
    results = read_rank_results(tmp_path, world_size=2)
    assert all(r["world_size"] == 2 and r["partitioned"] for r in results)
    assert results[0]["losses"] == results[1]["losses"]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = torch.arange(2 * 16).reshape(2, 16) % 250 + 3
    expected = []
    for _ in range(3):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert results[0]["losses"] == pytest.approx(expected, rel=1e-5)
    assert expected[-1] < expected[0]


def test_single_process_world_of_one(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores each afterwards, also the ones we set
        monkeypatch.delenv(var)
    assert init_distributed() == (0, 1)
    # Rank 0's answer (here the only rank's), and its ValueError, come back through the broadcast.
    assert decided_by_rank_zero(lambda: "step00000004") == "step00000004"

    def refuse():
        raise ValueError("no complete checkpoint")

    with pytest.raises(ValueError, match="no complete checkpoint"):
        decided_by_rank_zero(refuse)
    shutdown_distributed()
    assert not torch.distributed.is_initialized()


def test_each_rank_takes_a_gpu_it_can_see_under_per_rank_visibility(tmp_path):
    """Per-task GPU binding (`srun --gpus-per-task=1`, or mpirun giving each rank its own CUDA_VISIBLE_DEVICES, as
    here): each rank sees one GPU, device 0, whatever its local rank. With every GPU visible, rank i takes GPU i."""
    from cluster import OPEN_MPI, ensure_packages, launcher_env

    ensure_packages(OPEN_MPI)
    script = [sys.executable, str(Path(__file__).parent / "scripts" / "device_index.py"), str(tmp_path)]
    master = ["-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}"]
    ranks = [["-np", "1", *master, "-x", f"CUDA_VISIBLE_DEVICES={gpu}", *script] for gpu in ("0", "1")]
    run_command(["mpirun", "--allow-run-as-root", *ranks[0], ":", *ranks[1]], timeout=120, env=launcher_env())
    seen = read_rank_results(tmp_path, world_size=2)
    assert [(r["LOCAL_RANK"], r["CUDA_VISIBLE_DEVICES"]) for r in seen] == [("0", "0"), ("1", "1")]  # the launcher's split
    assert [r["index"] for r in seen] == [0, 0]  # LOCAL_RANK itself (1) names no device rank 1 can see
    assert [r["index_all_visible"] for r in seen] == [0, 1]
