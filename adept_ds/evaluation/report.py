"""The demo report: Markdown plus PNG charts (probe importance, training loss, unit LR scales)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from adept_ds.probe.layers import plot_probe_result  # noqa: E402
from adept_ds.runtime.run_log import last_per_step, read_records  # noqa: E402
from adept_ds.training.validation import plot_validation  # noqa: E402


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_losses(runs: dict[str, Path], path: Path) -> None:
    """Training loss against step, one line per run (its train records only: metrics.jsonl holds other kinds too)."""
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for method, run_dir in runs.items():
        steps = last_per_step(read_records(run_dir, "train"))
        axes.plot([m["step"] for m in steps], [m["loss"] for m in steps], label=method)
    axes.set_xlabel("step")
    axes.set_ylabel("domain training loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_lr_heatmap(history_file: Path, path: Path) -> bool:
    """Unit LR scales (rows: units, columns: recomputes). False if there is no history."""
    history = _read_jsonl(history_file)
    if not history:
        return False
    units = list(history[0]["scales"])
    matrix = [[record["scales"][unit] for record in history] for unit in units]
    figure, axes = plt.subplots(figsize=(max(5, len(history) * 0.6 + 3), max(3, len(units) * 0.22 + 1)))
    image = axes.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=2.0)
    axes.set_yticks(range(len(units)), units, fontsize=6)
    axes.set_xticks(range(len(history)), [str(record["step"]) for record in history], fontsize=7)
    axes.set_xlabel("step of importance recompute")
    axes.set_title("unit LR scale lr_U / lr_base\n(2: least important for general competence)", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _table(evaluations: dict[str, dict]) -> list[str]:
    base = evaluations["before"]
    lines = [
        "| model | general ppl | domain ppl | domain accuracy |",
        "|---|---|---|---|",
    ]
    for name, result in evaluations.items():
        ppl = result["perplexity"]
        cells = []
        for corpus in ("general", "domain"):
            value = ppl[corpus]["perplexity"]
            delta = "" if name == "before" else f" ({value - base['perplexity'][corpus]['perplexity']:+.2f})"
            cells.append(f"{value:.2f}{delta}")
        qa = result.get("qa", {})
        cells.append(f"{qa.get('accuracy', float('nan')):.1%} ({qa.get('correct', 0)}/{qa.get('total', 0)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_report(
    output: Path, probe_result: dict, expanded_layers: list[int], runs: dict[str, Path], evaluations: dict[str, dict], settings: dict
) -> Path:
    """Write `output/report.md` and its PNGs; returns the Markdown path."""
    output.mkdir(parents=True, exist_ok=True)
    plot_probe_result(probe_result, output / "probe_importance.png", selected=expanded_layers)
    plot_losses(runs, output / "training_loss.png")
    lines = [
        "# ADEPT demo report",
        "",
        f"Model: SmolLM2-135M-Instruct ({probe_result['num_layers']} layers). Settings: "
        + ", ".join(f"{key} {value}" for key, value in settings.items())
        + ".",
        "",
        "## Results",
        "",
        "Perplexity on held-out general text and held-out domain problems; accuracy = exact match of the greedy `#### answer`.",
        "",
        *_table(evaluations),
        "",
        "## Stage 1: general-competence layer importance",
        "",
        f"Probe ({probe_result['method']}, {probe_result['num_tokens']} tokens): loss increase when each layer is bypassed. "
        f"Expanded (least important): layers {expanded_layers}.",
        "",
        "![probe importance](probe_importance.png)",
        "",
        "## Stage 2: training",
        "",
        "![training loss](training_loss.png)",
        "",
    ]
    if plot_validation(runs, output / "validation_loss.png"):
        lines += ["Validation during training, on held-out general and domain blocks:", "", "![validation loss](validation_loss.png)", ""]
    if "adept" in runs and plot_lr_heatmap(runs["adept"] / "importance_history.jsonl", output / "lr_scales.png"):
        lines += ["Unit learning-rate scales of the ADEPT run at each importance recompute:", "", "![unit LR scales](lr_scales.png)", ""]
    path = output / "report.md"
    path.write_text("\n".join(lines))
    (output / "results.json").write_text(
        json.dumps({"settings": settings, "expanded_layers": expanded_layers, "evaluations": evaluations}, indent=2)
    )
    return path
