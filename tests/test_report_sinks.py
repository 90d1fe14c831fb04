"""report.to (issue 28): rank 0 of a real 2-rank run sends the same scalars (loss, per-unit LRs and importance,
validation, the guard, tokens per source) to TensorBoard, W&B (offline) and MLflow (its file store), each read back
with its own reader: TensorBoard's event accumulator, W&B's run file (its records, decoded with W&B's own protobuf
classes) and MLflow's client."""

from __future__ import annotations

import json
import struct

import pytest
from distributed import TESTS_DIR, cpu_env, run_deepspeed
from test_validation import TRAIN, forgetting, inputs  # noqa: F401  (the module fixture: a tiny model, sentences and digits)
from train_setup import overrides

from adept_ds.cli import main as cli_main

pytestmark = pytest.mark.dist


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(path) -> list:
    """The records of a W&B run file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB's log format
    (32 KiB blocks of chunks: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, position = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if (position % 32768) + 7 > 32768:  # the rest of a block too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_scalars(run_dir) -> dict[str, dict[int, float]]:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    scalars: dict[str, dict[int, float]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = row.pop("_step")
        for key, value in row.items():
            if not key.startswith("_"):
                scalars.setdefault(key, {})[step] = value
    return scalars


def mlflow_scalars(uri: str, run_name: str) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("adept_ds").experiment_id])
    assert run.info.run_name == run_name and run.info.status == "FINISHED"
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics}


@pytest.mark.parametrize("run", ["adept", "forgetting"])
def test_every_sink_gets_the_same_scalars(inputs, tmp_path, monkeypatch, run):  # noqa: F811
    """adept: loss, per-unit LRs, importance and scales, validation, tokens; forgetting (test_validation's pt_full run
    made to forget, +11 % general loss by step 4): the guard's scalars too."""
    run_dir = tmp_path / run
    mlflow_uri = (tmp_path / "mlruns").as_uri()
    values = {"eval.interval": 2, "train.max_steps": 4, "train.save_interval": 0}
    values |= {"report.to": "[tensorboard, wandb, mlflow]", "report.mlflow_tracking_uri": mlflow_uri}
    if run == "forgetting":
        args = forgetting(inputs, run_dir, **values, **{"guard.max_general_increase": 0.05, "guard.action": "cool"})
    else:
        args = overrides(inputs, run_dir, **values)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(TESTS_DIR)}  # real MLflow
    run_deepspeed(TRAIN, *args, timeout=300, **env)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens a file store only when asked

    board, wandb, mlflow = tensorboard_scalars(run_dir / "tensorboard"), wandb_scalars(run_dir), mlflow_scalars(mlflow_uri, run)
    wanted = ["train/loss", "train/tokens_per_s", "lr/", "validation/general_loss", "validation/domain_perplexity", "data/tokens/"]
    wanted += ["guard/general_rise", "guard/lr_multiplier"] if run == "forgetting" else ["importance/", "lr_scale/"]
    for prefix in wanted:
        assert any(tag.startswith(prefix) for tag in board), prefix
    assert set(wandb) == set(mlflow) == set(board)
    for tag, points in board.items():  # TensorBoard keeps float32
        assert wandb[tag] == pytest.approx(points, rel=1e-6) and mlflow[tag] == pytest.approx(points, rel=1e-6), tag
    assert sorted(board["train/loss"]) == [1, 2, 3, 4]


def test_a_sink_that_is_not_installed_is_refused_with_its_install_line(inputs, tmp_path, monkeypatch, capsys):  # noqa: F811
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    args = overrides(inputs, tmp_path / "run", **{"report.to": "[tensorboard, wandb]"})
    assert cli_main(["check", "--device", "cpu", "--skip-data", *args]) == 2
    err = capsys.readouterr().err
    assert "report.to names wandb, which is not installed: pip install 'adept_ds[wandb]'" in err and err.count("\n") == 1


def test_deepspeed_is_imported_without_its_autotuners_mlflow_and_mlflow_still_imports_after():
    """runtime.distributed.import_deepspeed (every rank's first deepspeed import) keeps deepspeed's autotuner from
    importing mlflow (2 s a rank), and leaves mlflow importable for the report sink, in a fresh process."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from adept_ds.runtime.distributed import import_deepspeed\n"
        "import_deepspeed()\n"
        "import deepspeed.autotuning.autotuner as autotuner\n"
        "assert 'mlflow' not in sys.modules and not autotuner.has_mlflow\n"
        "import mlflow\n"
        "print('mlflow', mlflow.__name__)\n"
    )
    env = cpu_env(PYTHONPATH=str(TESTS_DIR))  # the real MLflow, not tests/hidden's stand-in
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "mlflow mlflow" in result.stdout, result.stderr[-2000:]
