"""What a training run writes about itself (rank 0): metrics.jsonl, importance_history.jsonl, TensorBoard.

One record per line in `metrics.jsonl`: a training step ({"step", "loss", "tokens_per_s", "lr_base", ...}),
a dropped batch ({"step", "skipped"}), a validation ({"step", "validation": {corpus: {"loss", "perplexity",
"tokens"}}, "seconds"}) or a guard trigger ({"step", "guard": {...}}). The validation curves are also drawn
to `validation.png` at the end of a run.
"""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir = output_dir
        self.metrics_file = output_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def record(self, record: dict, file: str = "metrics.jsonl") -> None:
        with open(self.output_dir / file, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def validation(self, step: int, results: dict[str, dict], seconds: float) -> None:
        self.record({"step": step, "validation": results, "seconds": seconds})
        for name, result in results.items():
            self.scalars({f"validation/{name}_loss": result["loss"], f"validation/{name}_perplexity": result["perplexity"]}, step)

    def plot_validation(self) -> Path | None:
        """validation.png: general and domain validation loss against step; None without validations."""
        from adept_ds.report import plot_validation

        path = self.output_dir / "validation.png"
        return path if plot_validation({"run": self.output_dir}, path) else None

    def close(self) -> None:
        self.writer.close()

    def flush(self) -> None:
        self.writer.flush()
