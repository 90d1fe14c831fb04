"""What validation during training costs (issue 19): seconds per validation against the training it interrupts.

    python benchmarks/validation_cost.py [--steps 12] [--layers 12,14,16,17] [--intervals 200,50]

ADEPT on the demo model (SmolLM2-135M) + 4 copies after `--layers`, 2 ranks under the DeepSpeed launcher (launch/train.py,
the real entry point), ZeRO-3, the demo's domain and general corpora, micro-batch 2 x 256 tokens. For each eval.interval
the run validates at step 0 and at its last step on the default held-out set, whose size follows the interval
(eval.max_tokens=0: 2 % of the tokens trained per interval, validation.py), so `--steps` need not reach the interval.
Cost at an interval = seconds of the last validation / (interval x median step seconds), i.e. the share of training
time validation adds; step 0's validation includes first-forward warm-up and is shown, not used. Target (issue 19):
<= 3 % at the default interval. Writes benchmarks/results/validation_cost-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from suite import BENCHMARKS, REPO, demo_expansion, machine, run_launcher, run_overrides, write_result

from adept_ds.run.config import EvalConfig
from adept_ds.runtime.run_log import read_records

TARGET = 0.03


def train(model: Path, work: Path, args, interval: int) -> Path:
    """launch/train.py under the DeepSpeed launcher; the run directory."""
    name = f"interval{interval}"
    extra = {"data.cache_dir": work / "blocks", "train.max_steps": args.steps, "train.save_interval": 0, "train.export": False}
    overrides = run_overrides(name, "adept", model, work, args, extra={**extra, "eval.interval": interval})
    run_dir = Path(overrides["output_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl appends: start clean
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher), "--num_gpus", str(args.num_procs), "--master_port", str(args.port), str(REPO / "launch" / "train.py")]
    command += [f"{key}={value}" for key, value in overrides.items()]
    print(f"[validation_cost] eval.interval={interval}: {args.steps} steps", flush=True)
    run_launcher(name, command)
    return run_dir


def measure(run_dir: Path, interval: int, tokens_per_step: int) -> dict:
    steps = [tokens_per_step / r["tokens_per_s"] for r in read_records(run_dir, "train")]
    validations = read_records(run_dir, "validation")
    step = statistics.median(steps[1:])  # the first step warms up
    last = validations[-1]
    return {
        "interval": interval,
        "median_step_s": step,
        "validation_s_step0": validations[0]["seconds"],
        "validation_s": last["seconds"],
        "validation_tokens_per_corpus": {name: v["tokens"] for name, v in last["validation"].items()},
        "cost": last["seconds"] / (interval * step),
    }


def markdown(result: dict) -> str:
    settings = result["settings"]
    lines = [
        f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); demo model + 4 copies after layers "
        f"{result['layers']}; {settings['num_procs']} ranks, ZeRO-3, fp32, {settings['micro_batch_size']} x {settings['block_size']} tokens "
        f"per rank per step; {result['date']}; {result['seconds']:.0f} s in all.",
        "",
        "| eval.interval | median step s | validation s (step 0) | validation s | tokens per corpus | cost (share of training) |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        tokens = ", ".join(f"{name} {count}" for name, count in run["validation_tokens_per_corpus"].items())
        default = " (default)" if run["interval"] == result["default_interval"] else ""
        lines.append(
            f"| {run['interval']}{default} | {run['median_step_s']:.2f} | {run['validation_s_step0']:.2f} | {run['validation_s']:.2f} | "
            f"{tokens} | {run['cost']:.2%} |"
        )
    check = result["check"]
    lines += ["", f"Cost at the default interval: {check['value']:.2%} (target <= {TARGET:.0%}: {'met' if check['met'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(BENCHMARKS / "results"))
    parser.add_argument("--layers", default="12,14,16,17", help="copy after these layers of the demo model")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--intervals", default=f"{EvalConfig().interval},50", help="eval.interval values to measure")
    parser.add_argument("--num-procs", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--port", type=int, default=29751)
    args = parser.parse_args()

    started = time.time()
    output = Path(args.output)
    work, layers, model = demo_expansion(output, "validation_cost", args.layers)
    tokens_per_step = args.micro_batch_size * args.block_size * args.num_procs
    runs, default = [], EvalConfig().interval
    intervals = [int(value) for value in args.intervals.split(",")]
    for interval in dict.fromkeys([default, *intervals]):  # the default always: the target is set there
        runs.append(measure(train(model, work, args, interval), interval, tokens_per_step))
    at_default = runs[0]
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.time() - started,
        "settings": vars(args),
        "layers": layers,
        "default_interval": default,
        "runs": runs,
        "check": {"value": at_default["cost"], "target": TARGET, "met": at_default["cost"] <= TARGET},
    }
    write_result(output, "validation_cost", result, markdown(result))


if __name__ == "__main__":
    main()
