"""Issue 32: the document-mask studies' models scored both ways, so that masked and unmasked training are compared on
equal terms.

    python benchmarks/document_mask_eval.py runs/compare_mask_off runs/compare_mask_on [--output benchmarks/results/document_mask]

Each argument is a `benchmarks/compare_seeds.py --no-eval-document-mask` study. Its results.jsonl already holds each
run's held-out perplexities on plain packed blocks, every token scored (what a model trained without the mask
sees). This scores the demo model and every run's `final/` model again with each document alone (the document mask
on, the label at each document start dropped: compare_seeds' --eval-document-mask), and gives per study and variant
the mean ± sd of both: general perplexity increase and domain perplexity drop against the demo model scored the same
way, domain accuracy (greedy answers, which packing does not touch) and the median training step.
Writes `<output>/document_mask_eval.{json,md}`; a model already scored is not scored again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "document_mask")
    args = parser.parse_args()

    from adept_ds.data.blocks import Packing
    from adept_ds.evaluation.evaluate import evaluate_model
    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.pipeline import DOMAIN_TEST, GENERAL_HELDOUT

    corpora, alone = {"general": GENERAL_HELDOUT, "domain": DOMAIN_TEST}, Packing(document_mask=True, loss_on_document_start=False)
    args.output.mkdir(parents=True, exist_ok=True)
    record_file = args.output / "document_mask_eval.json"
    scored = json.loads(record_file.read_text()) if record_file.is_file() else {}

    def perplexities(model_dir: Path) -> dict[str, float]:
        """Each held-out corpus's perplexity with every document scored alone (cached in the record)."""
        key = str(model_dir.resolve())
        if key not in scored:
            evaluated = evaluate_model(model_dir, corpora, packing=alone)
            scored[key] = {name: evaluated["perplexity"][name]["perplexity"] for name in corpora}
            record_file.write_text(json.dumps(scored, indent=2))
        return scored[key]

    base = perplexities(fetch_demo_model())
    lines = [
        "| study | variant | runs | plain blocks: general increase | plain: domain drop | documents alone: general increase | "
        "alone: domain drop | domain accuracy | step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for study in args.studies:
        results = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
        for variant in dict.fromkeys(result["variant"] for result in results):
            runs = [result for result in results if result["variant"] == variant]
            alone_figures = [perplexities(study / f"seed{run['seed']}" / variant.replace(":", "_") / "final") for run in runs]
            general = [figures["general"] - base["general"] for figures in alone_figures]
            domain = [base["domain"] - figures["domain"] for figures in alone_figures]
            accuracy = [run["accuracy"] for run in runs]
            step = statistics.median(run["step_s"] for run in runs)
            lines.append(
                f"| {study.name} | {variant} | {len(runs)} | {mean_sd([r['general_increase'] for r in runs])} | "
                f"{mean_sd([r['domain_drop'] for r in runs])} | {mean_sd(general)} | {mean_sd(domain)} | "
                f"{statistics.fmean(accuracy):.1%} | {step:.2f} |"
            )
    table = "\n".join(lines) + "\n"
    (args.output / "document_mask_eval.md").write_text(
        f"Demo model, each document alone: general {base['general']:.2f}, domain {base['domain']:.2f} perplexity.\n\n{table}"
    )
    print(table)


if __name__ == "__main__":
    main()
