"""What a training run writes about itself (rank 0): metrics.jsonl, importance_history.jsonl, and the scalars to
each sink of report.to (TensorBoard, W&B, MLflow).

`metrics.jsonl` holds one record per line, each of one kind, named by its "kind" field:
- train: an optimizer step ({"step", "loss", "tokens_per_s", "lr_base", "lr_max", "lr_multiplier", "tokens", and per device
  "tflops_per_s" and "tflops_per_s_6n", with "mfu" and "mfu_6n" when the peak is known: training/throughput.py});
- skipped: a global batch dropped for a non-finite loss ({"step", "skipped", "position"});
- validation: held-out losses ({"step", "validation": {corpus: {"loss", "perplexity", "tokens"}}, "seconds"});
- guard: a forgetting-guard trigger ({"step", "guard": {...}});
- resume: where a resumed run continued from ({"step", "resume": {"checkpoint", "world_size", "universal"}}).
This module owns the kinds: every reader asks `read_records` for the kinds it needs, so a record of a kind it
does not know (a newer writer's) is never read as one it does. Files written before records carried "kind" are
read by their keys.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
RECORD_KINDS = ("train", "skipped", "validation", "guard", "resume")


def record_kind(record: dict) -> str | None:
    """The kind of a metrics record; None for one of no kind this version knows."""
    if "kind" in record:
        return record["kind"]
    for kind in ("validation", "guard", "resume", "skipped"):  # older files: the kind's own key
        if kind in record:
            return kind
    return "train" if "loss" in record else None


def read_records(path: str | Path, kind: str) -> list[dict]:
    """The records of one kind in a run's metrics file (or its run directory), in file order."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown metrics record kind {kind!r}: choose one of {', '.join(RECORD_KINDS)}")
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [record for record in records if record_kind(record) == kind]


def last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last written (a run resumed from an earlier checkpoint repeats steps), by step."""
    return [record for _, record in sorted({record["step"]: record for record in records}.items())]


class TensorBoardSink:
    def __init__(self, output_dir: Path, report, run_config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in output_dir/wandb (online, or offline under WANDB_MODE=offline: `wandb sync` uploads it later)."""

    def __init__(self, output_dir: Path, report, run_config: dict):
        import wandb

        name = report.run_name or output_dir.name
        self.run = wandb.init(project=report.project, name=name, dir=str(output_dir), config=run_config, reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run under experiment `report.project`, in report.mlflow_tracking_uri, $MLFLOW_TRACKING_URI, or a file
    store in output_dir/mlruns. MLflow's own client, so no process-wide active run is left behind."""

    def __init__(self, output_dir: Path, report, run_config: dict):
        import os

        from mlflow.tracking import MlflowClient

        uri = report.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").absolute().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store only on request (mlflow-skinny has no database store)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(report.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(report.project)
        self.run_id = self.client.create_run(experiment_id, run_name=report.run_name or output_dir.name).info.run_id
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in _flatten(run_config).items() if len(str(value)) <= 6000]
        for start in range(0, len(params), 100):  # log_batch takes 100 params at most
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # log_batch takes 1000 metrics at most
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
"""report.to's names: each takes every scalar RunLog.scalars is given."""
INSTALL = {"wandb": "pip install 'adept_ds[wandb]'", "mlflow": "pip install 'adept_ds[mlflow]'"}


def check_sinks(names: list[str]) -> None:
    """Refuse a report.to sink whose package is not installed (before any process group starts)."""
    import importlib.util

    for name in names:
        if name in INSTALL and importlib.util.find_spec(name) is None:
            raise ValueError(f"report.to names {name}, which is not installed: {INSTALL[name]} (or drop it from report.to)")


class RunLog:
    def __init__(self, output_dir: Path, report=None, run_config: dict | None = None):
        """`report`: the run config's ReportConfig (which sinks; default TensorBoard alone)."""
        self.output_dir = output_dir
        self.metrics_file = output_dir / METRICS_FILE
        names = ["tensorboard"] if report is None else report.to
        self.sinks = [SINKS[name](output_dir, report, run_config or {}) for name in names]

    def _append(self, file: str, record: dict) -> None:
        with open(self.output_dir / file, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def metric(self, kind: str, record: dict) -> None:
        """Append a metrics record of `kind` (RECORD_KINDS) to metrics.jsonl."""
        assert kind in RECORD_KINDS, kind
        self._append(METRICS_FILE, {"kind": kind, **record})

    def importance(self, record: dict) -> None:
        """Append a unit-importance recompute to importance_history.jsonl."""
        self._append("importance_history.jsonl", record)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """The same scalars to every report.to sink."""
        for sink in self.sinks:
            sink.log(values, step)

    def validation(self, step: int, results: dict[str, dict], seconds: float) -> None:
        self.metric("validation", {"step": step, "validation": results, "seconds": seconds})
        for name, result in results.items():
            self.scalars({f"validation/{name}_loss": result["loss"], f"validation/{name}_perplexity": result["perplexity"]}, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()
