"""Where does `--k auto` land among fixed k? ADEPT on the demo model for each k, one seed, side by side.

    python benchmarks/auto_k_sweep.py [--ks 1,2,4,8,auto] [--steps 40] [--max-questions 30] [--output runs/ksweep]

Each k is one `benchmarks/compare_seeds.py --seeds 1 --variants adept --k K` run in `<output>/k<K>` (so a
finished k is not trained again); the first k's probe and base-model evaluation are copied to the others,
which would compute exactly the same (same seed, corpus and model). Writes benchmarks/results/auto_k-<device>.{json,md}:
general perplexity increase, domain perplexity drop and domain accuracy per k, and which k auto chose.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from suite import BENCHMARKS, machine, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="1,2,4,8,auto", help="comma-separated k values, auto among them (default 1,2,4,8,auto)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-questions", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("runs/ksweep"))
    args = parser.parse_args()
    ks = [k.strip() for k in args.ks.split(",") if k.strip()]

    started = time.perf_counter()
    first = args.output / f"k{ks[0]}"
    rows = []
    for k in ks:
        run = args.output / f"k{k}"
        for shared in ("before.json", "seed0/probe.json"):
            if (first / shared).is_file() and not (run / shared).is_file():
                (run / shared).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(first / shared, run / shared)
        command = [sys.executable, str(BENCHMARKS / "compare_seeds.py"), "--seeds", "1", "--steps", str(args.steps)]
        command += ["--variants", "adept", "--k", k, "--max-questions", str(args.max_questions), "--output", str(run)]
        print(f"[auto_k_sweep] k={k}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)
        result = json.loads((run / "results.jsonl").read_text().splitlines()[-1])
        manifest = json.loads((run / "seed0" / "adept_expanded" / "adept_expansion.json").read_text())
        rows.append(
            {"k": k, "layers": manifest["expanded_layers"], **{m: result[m] for m in ("general_increase", "domain_drop", "accuracy")}}
        )

    auto = next((row for row in rows if row["k"] == "auto"), None)
    same = [row["k"] for row in rows if auto and row["k"] != "auto" and row["layers"] == auto["layers"]]
    lines = []
    for row in rows:
        label = f"auto ({len(row['layers'])})" if row["k"] == "auto" else row["k"]
        lines.append(
            f"| {label} | {', '.join(map(str, row['layers']))} | {row['general_increase']:+.2f} | {row['domain_drop']:.2f} | "
            f"{row['accuracy']:.1%} |"
        )
    note = ""
    if auto:
        note = (
            f"\nauto chose k = {len(auto['layers'])} (layers {auto['layers']})" + (f", the same as k = {same[0]}" if same else "") + ".\n"
        )
    table = (
        f"Machine: {machine()['cpu']} ({machine()['cores']} cores); demo model, ADEPT, 1 seed (0), {args.steps} steps, "
        f"{args.max_questions} domain questions; {time.perf_counter() - started:.0f} s this invocation. Each k ran "
        f"`python benchmarks/compare_seeds.py --seeds 1 --steps {args.steps} --variants adept --k K --max-questions "
        f"{args.max_questions} --output {args.output}/kK`.\n\n"
        "| k | expanded layers | general ppl increase | domain ppl drop | domain accuracy |\n|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n"
        + note
    )
    write_result(
        BENCHMARKS / "results", "auto_k", {"machine": machine(), "settings": vars(args) | {"output": str(args.output)}, "rows": rows}, table
    )


if __name__ == "__main__":
    main()
