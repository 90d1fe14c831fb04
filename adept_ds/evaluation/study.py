"""Multi-seed comparisons that decide things: per-variant mean and standard deviation, and the Pareto front.

A result is one run: {"variant", "seed", "general_increase" (general perplexity after - before; lower
is better), "domain_drop" (domain perplexity before - after; higher is better)}, and optionally "accuracy" (with a QA
file) and "step_s" (the run's median seconds per training step, `step_seconds`); a variant's row leaves out a metric
one of its runs lacks.
`aggregate` gives each variant's mean and sample standard deviation; `pareto_front` the runs that no
other run beats on both axes (forgetting less and learning at least as much, or the reverse);
`plot_tradeoff` draws every run as a point, general increase against domain drop, front marked.
"""

from __future__ import annotations

import statistics
from pathlib import Path

METRICS = ("general_increase", "domain_drop", "accuracy")
STEP_TIME = "step_s"


def perplexity_change(before: dict, after: dict) -> dict:
    """General perplexity increase and domain perplexity drop from `before` to `after` (`evaluate_model` results)."""
    general = after["perplexity"]["general"]["perplexity"] - before["perplexity"]["general"]["perplexity"]
    domain = before["perplexity"]["domain"]["perplexity"] - after["perplexity"]["domain"]["perplexity"]
    return {"general_increase": general, "domain_drop": domain}


def run_result(variant: str, seed: int, before: dict, after: dict) -> dict:
    """One run's figures from `evaluate_model` results before and after training (accuracy when a QA file was scored)."""
    accuracy = {"accuracy": after["qa"]["accuracy"]} if "qa" in after else {}
    return {"variant": variant, "seed": seed, **perplexity_change(before, after), **accuracy}


def aggregate(results: list[dict]) -> dict[str, dict]:
    """{variant: {"runs": n, metric: (mean, sd)}}; sd is the sample standard deviation (0 for one run)."""
    table: dict[str, dict] = {}
    for variant in dict.fromkeys(result["variant"] for result in results):
        runs = [result for result in results if result["variant"] == variant]
        row: dict = {"runs": len(runs)}
        for metric in [m for m in (*METRICS, STEP_TIME) if all(m in run for run in runs)]:
            values = [run[metric] for run in runs]
            row[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        table[variant] = row
    return table


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b on both axes and better on one (less forgetting, more domain gain)."""
    no_worse = a["general_increase"] <= b["general_increase"] and a["domain_drop"] >= b["domain_drop"]
    better = a["general_increase"] < b["general_increase"] or a["domain_drop"] > b["domain_drop"]
    return no_worse and better


def pareto_front(results: list[dict]) -> list[dict]:
    return [result for result in results if not any(dominates(other, result) for other in results)]


def markdown_table(table: dict[str, dict]) -> str:
    timed = all(STEP_TIME in row for row in table.values())
    lines = [
        "| variant | runs | general ppl increase | domain ppl drop | domain accuracy |" + (" step s |" if timed else ""),
        "|---|---|---|---|---|" + ("---|" if timed else ""),
    ]
    for variant, row in table.items():
        (g, gs), (d, ds) = row["general_increase"], row["domain_drop"]
        accuracy = f"{row['accuracy'][0]:.1%} ± {row['accuracy'][1]:.1%}" if "accuracy" in row else "-"  # no QA file scored
        step = f" {row[STEP_TIME][0]:.2f} ± {row[STEP_TIME][1]:.2f} |" if timed else ""
        lines.append(f"| {variant} | {row['runs']} | {g:+.2f} ± {gs:.2f} | {d:.2f} ± {ds:.2f} | {accuracy} |{step}")
    return "\n".join(lines) + "\n"


def step_seconds(run_dir: Path) -> float:
    """A run's median seconds per training step (importance passes and validations excluded), from its metrics.jsonl:
    each step's tokens over its tokens/s. The first step, which warms up, is left out when there are others."""
    from adept_ds.runtime.run_log import last_per_step, read_records

    records = last_per_step(read_records(run_dir, "train"))
    totals = [sum(record["tokens"].values()) for record in records]
    seconds = [(total - before) / record["tokens_per_s"] for record, total, before in zip(records, totals, [0, *totals])]
    return statistics.median(seconds[1:] or seconds)


def plot_tradeoff(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(results)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(result["variant"] for result in results):
        runs = [result for result in results if result["variant"] == variant]
        axes.scatter([r["general_increase"] for r in runs], [r["domain_drop"] for r in runs], label=variant, s=30)
    finish_tradeoff(figure, axes, front, path)


def finish_tradeoff(figure, axes, front: list[dict], path: Path) -> None:
    """The Pareto front (dashed, circled), the axes' names and the legend; saved to `path` and closed."""
    import matplotlib.pyplot as plt

    front = sorted(front, key=lambda r: r["general_increase"])
    axes.plot([r["general_increase"] for r in front], [r["domain_drop"] for r in front], "k--", lw=1, label="Pareto front")
    axes.scatter([r["general_increase"] for r in front], [r["domain_drop"] for r in front], s=110, facecolors="none", edgecolors="k")
    axes.set_xlabel("general perplexity increase (forgetting; lower is better)")
    axes.set_ylabel("domain perplexity drop (learning; higher is better)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
