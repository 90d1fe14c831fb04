"""Issue 32: what the document mask costs a training step on this machine, and at what block size it starts to.

    python benchmarks/document_mask_step.py [--block-sizes 128,1024] [--methods adept] [--rounds 2] [--output DIR]

The demo model (expanded after layers 12,16,17,18, as the probe picks for the demo), 2 CPU ranks under ZeRO-3,
benchmarks/train_step.py's timed steps (suite.run_ranks), with `data.document_mask` off and on, alternated round by
round so that the machine's drift falls on both alike. With the mask on, transformers builds a block-diagonal causal
mask from the restarting position ids and sdpa runs with that explicit mask instead of its causal-only path; the
cost grows with the block's attention, so it is measured at the demo's 128 tokens and at a long block.
Prints and writes `<output>/document_mask_step.{json,md}`: the median step of each, every round's, and on/off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import REPO, add_run_arguments, demo_expansion, machine, run_ranks, summarise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", default="128,1024")
    parser.add_argument("--methods", default="adept")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "document_mask")
    add_run_arguments(parser, warmup_steps=1, timed_steps=3, port=29561)
    args = parser.parse_args()
    from adept_ds.model.demo_model import fetch_demo_model

    work, _, expanded = demo_expansion(REPO / "runs", "document_mask_step", "12,16,17,18")  # models and runs stay out of git
    models = {"adept": expanded, "pt_full": fetch_demo_model()}
    steps: dict[str, list[float]] = {}
    for block_size in [int(size) for size in args.block_sizes.split(",")]:
        args.block_size = block_size
        for method in args.methods.split(","):
            for round_ in range(args.rounds):
                for mask in ("off", "on"):
                    key = f"{method} {block_size} {mask}"
                    extra = {"data.document_mask": mask == "on", "data.cache_dir": work / "blocks"}
                    ranks = run_ranks(f"{method}_{block_size}_{mask}_{round_}", method, models[method], work, args, extra=extra)
                    steps.setdefault(key, []).append(summarise(ranks)["step_seconds"])
    lines = ["| method | block | mask off: median step (rounds) | mask on | on / off |", "|---|---|---|---|---|"]
    for key in [k for k in steps if k.endswith(" off")]:
        method, block_size, _ = key.split()
        off, on = steps[key], steps[key.removesuffix("off") + "on"]
        ratio = statistics.median(on) / statistics.median(off)
        shown = [f"{statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})" for times in (off, on)]
        lines.append(f"| {method} | {block_size} | {shown[0]} | {shown[1]} | {ratio:.3f} |")
    table = "\n".join(lines) + "\n"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "document_mask_step.json").write_text(json.dumps({"machine": machine(), "steps": steps}, indent=2) + "\n")
    (args.output / "document_mask_step.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
