"""The interpolation curve: a trained model merged toward its base at several alphas (model/merge.py), each point
evaluated, so a user sees how much general ability each step back toward the base buys and what domain gain it costs.

`merge_curve` writes `OUTPUT/alpha_A/` (an HF checkpoint per alpha), `OUTPUT/merge_curve.json` (one point per alpha:
general perplexity increase and domain perplexity drop against the base, domain accuracy with a QA file) and
`OUTPUT/merge_curve.png`. The ends are the models themselves: alpha 0 is the base (its function exactly), alpha 1
the trained model. A point already in merge_curve.json is not merged or evaluated again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adept_ds.data.blocks import Packing
from adept_ds.evaluation.evaluate import evaluate_model
from adept_ds.evaluation.study import perplexity_change
from adept_ds.model.merge import check_alpha, merge_checkpoints

CURVE_FILE = "merge_curve.json"


def point(alpha: float, base: dict, evaluated: dict) -> dict:
    """One alpha's figures against the base's evaluation."""
    general, domain = (evaluated["perplexity"][name]["perplexity"] for name in ("general", "domain"))
    result = {"alpha": alpha, "general_perplexity": general, "domain_perplexity": domain, **perplexity_change(base, evaluated)}
    if "qa" in evaluated:
        result["accuracy"] = evaluated["qa"]["accuracy"]
    return result


def merge_curve(
    base_model: str | Path,
    trained_model: str | Path,
    alphas: list[float],
    output: str | Path,
    corpora: dict[str, str | Path],
    qa: str | Path | None = None,
    max_blocks: int = 64,
    max_questions: int | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    block_size: int = 128,
    packing: Packing = Packing(),
    evaluations: dict[float, dict] | None = None,
    keep_models: bool = True,
) -> list[dict]:
    """Merge `trained_model` toward `base_model` at each of `alphas` and evaluate every point (see the module's
    docstring); `corpora` must name "general" and "domain". Returns the points, alpha ascending.

    `evaluations` holds `evaluate_model` results already made ({0.0: the base's, 1.0: the trained model's}), not
    made again; without `keep_models` each merged checkpoint is deleted once evaluated (a sweep keeps the figures)."""
    for alpha in alphas:
        check_alpha(alpha)
    missing = {"general", "domain"} - set(corpora)
    if missing:
        raise ValueError(f"the merge curve needs both held-out corpora: give --{' and --'.join(sorted(missing))}")
    output, models = Path(output), {"base_model": str(Path(base_model).resolve()), "trained_model": str(Path(trained_model).resolve())}
    output.mkdir(parents=True, exist_ok=True)
    curve_file = output / CURVE_FILE
    saved = json.loads(curve_file.read_text()) if curve_file.is_file() else {"points": [], **models}
    if {key: saved[key] for key in models} != models:
        raise ValueError(
            f"{curve_file} is the curve of other models ({saved['base_model']}, {saved['trained_model']}): give another --output"
        )
    done = {entry["alpha"]: entry for entry in saved["points"]}

    known = dict(evaluations or {})

    def evaluate(model_dir) -> dict:
        return evaluate_model(model_dir, corpora, qa, block_size, max_blocks, max_questions, cache_dir=cache_dir, packing=packing)

    base = saved.get("base_evaluation") or known.get(0.0) or evaluate(base_model)
    for alpha in sorted({0.0, *alphas, 1.0}):
        if alpha in done:
            continue
        if alpha == 0.0:
            evaluated = base
        elif alpha == 1.0:
            evaluated = known.get(1.0) or evaluate(trained_model)
        else:
            merged = merge_checkpoints(
                base_model, trained_model, alpha, output / f"alpha_{alpha:g}", overwrite=True, show_progress=show_progress
            )
            evaluated = evaluate(merged)
            if not keep_models:
                shutil.rmtree(merged)
        done[alpha] = point(alpha, base, evaluated)
        record = {**models, "base_evaluation": base}
        record["points"] = [done[key] for key in sorted(done)]
        curve_file.write_text(json.dumps(record, indent=2) + "\n")  # after every point: a long curve keeps what it measured
    points = [done[key] for key in sorted(done)]
    plot_curve(points, output / "merge_curve.png")
    return points


def plot_curve(points: list[dict], path: Path) -> None:
    """General perplexity increase against domain perplexity drop, one point per alpha, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.plot([p["general_increase"] for p in points], [p["domain_drop"] for p in points], "o-")
    for entry in points:
        axes.annotate(
            f"alpha {entry['alpha']:g}",
            (entry["general_increase"], entry["domain_drop"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    axes.set_xlabel("general perplexity increase (forgetting; lower is better)")
    axes.set_ylabel("domain perplexity drop (learning; higher is better)")
    axes.set_title("merged toward the base: alpha 0 = base, 1 = trained")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
