"""ZeRO++ quantized weight gathers (train.zeropp=qwz) under ADEPT: what they cost in quality, beside the bytes.

    python benchmarks/zeropp_quantization.py [--steps 40] [--lrs 3e-4,3e-5] [--layers 12,14,16,17] [--max-questions 30]

The demo model with 4 copies after `--layers`, trained by ADEPT on the demo's schedule (cosine, importance every
steps/5) on 2 ranks under ZeRO-3, at the demo's lr 3e-4 and at 3e-5, nearer what 7B-70B runs use. The frozen
backbone is sharded, so that qwZ has the backbone's gathers to quantize. Two runs per lr on the same data:
train.zeropp=off and =qwz (benchmarks/qwz_rank.py). On CPU, qwZ runs through adept_ds.run.zeropp.TorchQuantizer, a
stand-in for DeepSpeed's CUDA quantizer, so the seconds per step say nothing of the kernel's.
Each export is scored on held-out general and domain perplexity and domain accuracy (adept_ds.evaluation.evaluate), beside
the bytes all-gathered per step. Also reported: the share of exact zeros in the copies' zero-initialised o_proj /
down_proj as their forwards see them, which shows whether quantization keeps the copies from leaving zero.
Writes benchmarks/results/zeropp_quantization-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from suite import BENCHMARKS, demo_expansion, launch_ranks, launcher_command, machine, run_overrides, write_result

MODES = {"ZeRO-3": "off", "ZeRO-3 + qwZ": "qwz"}


def markdown(result: dict) -> str:
    before = result["before"]["perplexity"]
    lines = [
        f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); demo model + copies after layers "
        f"{result['layers']}; ADEPT, {result['steps']} steps, 2 ranks, frozen weights sharded; {result['date']}; "
        f"{result['seconds']:.0f} s in all. Before training: general ppl {before['general']['perplexity']:.2f}, "
        f"domain ppl {before['domain']['perplexity']:.2f}, accuracy {result['before']['qa']['accuracy']:.0%}.",
        "",
        "| run | lr | general ppl | domain ppl | domain accuracy | MB all-gathered / step | s / step | copies' o/down seen as 0: "
        "step 1 / mean / last | steps with most of them 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"].values():
        ppl, zeros = run["evaluation"]["perplexity"], run["zero_share_seen"]
        lines.append(
            f"| {run['mode']} | {run['lr']:g} | {ppl['general']['perplexity']:.2f} | {ppl['domain']['perplexity']:.2f} | {run['evaluation']['qa']['accuracy']:.0%} | "
            f"{run['gathered_mb_per_step']:.1f} | {run['seconds_per_step']:.2f} | {zeros[0]:.0%} / {statistics.mean(zeros):.0%} / "
            f"{zeros[-1]:.0%} | {sum(share > 0.5 for share in zeros)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(BENCHMARKS / "results"))
    parser.add_argument("--layers", default="12,14,16,17", help="copy after these layers of the demo model")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lrs", default="3e-4,3e-5", help="comma-separated base learning rates")
    parser.add_argument("--max-questions", type=int, default=30)
    parser.add_argument("--port", type=int, default=29761)
    args = parser.parse_args()

    from adept_ds.evaluation.evaluate import evaluate_model
    from adept_ds.pipeline import DOMAIN_TEST, GENERAL_HELDOUT

    started = time.time()
    output = Path(args.output)
    work, layers, model = demo_expansion(output, "zeropp_quantization", args.layers)
    corpora = {"general": GENERAL_HELDOUT, "domain": DOMAIN_TEST}
    shape = argparse.Namespace(block_size=128, micro_batch_size=2)
    schedule = {
        "train.max_steps": args.steps,
        "train.save_interval": args.steps,
        "train.frozen_weights": "sharded",
        "scheduler.type": "WarmupCosineLR",
        "scheduler.warmup_steps": max(1, args.steps // 10),
        "importance.interval": max(1, args.steps // 5),
        "importance.batches": 1,
        "data.cache_dir": work / "blocks",
        "eval.interval": 0,
    }
    runs = {}
    for lr, (name, mode) in itertools.product([float(lr) for lr in args.lrs.split(",")], MODES.items()):
        slug = f"zeropp_{mode}_lr{lr:g}"
        result_dir = work / "runs" / slug
        result_dir.mkdir(parents=True, exist_ok=True)
        overrides = run_overrides(slug, "adept", model, work, shape, extra={**schedule, "optimizer.lr": lr, "train.zeropp": mode})
        command = launcher_command(2, args.port)
        command += [str(BENCHMARKS / "qwz_rank.py"), str(result_dir), *[f"{key}={value}" for key, value in overrides.items()]]
        print(f"[zeropp] {name}, lr {lr:g}: adept, {args.steps} steps", flush=True)
        rank0 = launch_ranks(name, command, result_dir, 2)[0]
        runs[f"{name}, lr {lr:g}"] = {
            **rank0,
            "mode": name,
            "lr": lr,
            "gathered_mb_per_step": rank0["gathered_bytes"] / args.steps / 1e6,
            "seconds_per_step": rank0["train_seconds"] / args.steps,
            "evaluation": evaluate_model(result_dir / "final", corpora, DOMAIN_TEST, max_questions=args.max_questions),
        }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "layers": layers,
        "steps": args.steps,
        "before": evaluate_model(model, corpora, DOMAIN_TEST, max_questions=args.max_questions),
        "runs": runs,
        "seconds": time.time() - started,
    }
    write_result(output, "zeropp_quantization", result, markdown(result))


if __name__ == "__main__":
    main()
