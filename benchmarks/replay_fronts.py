"""The Pareto front at each replay setting over several sweeps' results, e.g. ADEPT at another k beside the demo study:

    python benchmarks/replay_fronts.py benchmarks/results/sweep31/results.jsonl k8=benchmarks/results/sweep31_k8/results.jsonl

`adept-ds sweep` takes one expansion per sweep, so a recipe at another k is another sweep; its points are named
`TAG: ...` and count as their own method. Prints each setting's front (means over seeds, merges included) and,
for each recipe and merge on it, mean ± sample sd over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from adept_ds.evaluation.study import pareto_front
from adept_ds.evaluation.sweep import method_and_replay, trade_off_points


def tagged_points(argument: str) -> list[dict]:
    tag, _, path = argument.partition("=") if "=" in argument else ("", "", argument)  # a path may hold "=", a tag not
    results = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    points = trade_off_points(results)
    for point in points:
        method, point["setting"] = method_and_replay(point["variant"])
        point["method"] = f"{tag}: {method}" if tag else method
        point["name"] = f"{tag}: {point['name']}" if tag else point["name"]
        runs = [r for r in results if (r["variant"], r["lr"]) == (point["variant"], point["lr"])]
        at_alpha = runs if point["alpha"] == 1.0 else [next(p for p in r["merge_curve"] if p["alpha"] == point["alpha"]) for r in runs]
        for metric in ("general_increase", "domain_drop"):
            values = [r[metric] for r in at_alpha]
            point[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else float("nan")
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="[TAG=]results.jsonl of an `adept-ds sweep`")
    args = parser.parse_args()
    points = [point for argument in args.results for point in tagged_points(argument)]
    for setting in dict.fromkeys(point["setting"] for point in points):
        at_setting = [point for point in points if point["setting"] == setting]
        if len({point["method"] for point in at_setting}) < 2:
            continue
        print(f"\n{setting}: general ppl increase / domain ppl drop, mean ± sd over seeds")
        for point in sorted(pareto_front(at_setting), key=lambda p: p["general_increase"]):
            print(
                f"  {point['name']} ({point['seeds']} seeds): {point['general_increase']:+.2f} ± {point['general_increase_sd']:.2f}"
                f" / {point['domain_drop']:.3f} ± {point['domain_drop_sd']:.2f}"
            )


if __name__ == "__main__":
    main()
