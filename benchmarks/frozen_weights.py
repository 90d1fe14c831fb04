"""Where the frozen backbone lives (issue 16): bytes all-gathered per step, step time and peak memory per rank,
side by side in one run.

    python benchmarks/frozen_weights.py [--layers 12,14,16,17] [--timed-steps 4] [--block-size 256]

ADEPT on the demo model (SmolLM2-135M) with k=4 copies after `--layers` (the suite's probe placement), 2 ranks,
ZeRO-3 (the shipped zero3.json), the same data and batch; the runs differ in one setting each:
- before: train.frozen_weights=sharded with the ~3-layer ZeRO-3 window ("auto" before it planned memory);
- sharded, wide window: DeepSpeed's default window, gathered layers stay live from forward to backward;
- DeepSpeed persistence: sharded, stage3_param_persistence_threshold=1e12, so every weight is ds_persist
  (DeepSpeed's own way of keeping weights gathered; it re-partitions and re-gathers them at every optimizer step);
- replicated: train.frozen_weights=replicated, window "auto" (what `auto` picks on this machine);
- replicated, 2 threads per rank: the same with train.threads=2 (torch's default here) on this 2-core machine;
- sharded 4 ranks / hpz 4 ranks: sharded with the wide window on 4 ranks (micro batch 1: the same global batch),
  without and with ZeRO++ hpZ over 2 ranks (train.zeropp=hpz, hpz_ranks=2: 2 "nodes" of 2). "Across groups" is
  what a cluster would send between nodes: all of it without hpZ, and with it what is not gathered inside a group.
Bytes are counted on rank 0 over the timed steps (distributed.AllGatherCounter). Peak memory is the larger
rank's peak RSS over the whole run. Targets (issue 16): replicated all-gathers <= 0.1x and steps in <= 0.8x the
time of `before`. Writes benchmarks/results/frozen_weights-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from suite import BENCHMARKS, REPO, add_run_arguments, demo_expansion, machine, run_ranks, summarise, write_result

from adept_ds.model.families import decoder_layer_numel
from adept_ds.run.ds_config import DEEPSPEED_WINDOW, WINDOW_LAYERS

TARGETS = {"gathered_ratio": 0.1, "step_ratio": 0.8}


def ds_config(work: Path, name: str, zero: dict) -> Path:
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update(zero)
    path = work / f"zero3_{name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def markdown(result: dict) -> str:
    runs, before = result["runs"], result["runs"]["before"]
    lines = [
        f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); demo model + {len(result['layers'])} copies after "
        f"layers {result['layers']}; {result['settings']['num_procs']} ranks, ZeRO-3, fp32 on CPU, "
        f"{result['settings']['micro_batch_size']} x {result['settings']['block_size']} tokens per rank per step; {result['date']}; "
        f"{result['seconds']:.0f} s in all.",
        "",
        "| run | ranks | all-gathered MB / step | vs before | across groups MB / step | step s | vs before | importance s | "
        "peak RSS MB / rank | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['ranks']} | {run['gathered_mb_per_step']:.1f} | "
            f"{run['gathered_mb_per_step'] / before['gathered_mb_per_step']:.3f} | {run['across_groups_mb_per_step']:.1f} | "
            f"{run['step_seconds']:.2f} | {run['step_seconds'] / before['step_seconds']:.3f} | {run['importance_seconds']:.2f} | "
            f"{run['peak_memory_mb']:.0f} | {run['threads']} |"
        )
    lines += ["", "| measure | value | target |", "|---|---|---|"]
    for check in result["checks"]:
        lines.append(f"| {check['measure']} | {check['value']:.3f} | <= {check['target']} ({'met' if check['met'] else 'NOT met'}) |")
    lines += ["", "Layouts as the runs logged them:", ""] + [f"- {name}: {run['layout']}" for name, run in runs.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(BENCHMARKS / "results"))
    parser.add_argument("--layers", default="12,14,16,17", help="copy after these layers of the demo model")
    parser.add_argument(
        "--runs", help="comma-separated subset of the runs (default: all); `before` and `replicated` are needed for the checks"
    )
    add_run_arguments(parser, warmup_steps=2, timed_steps=4, port=29741)
    args = parser.parse_args()

    started = time.time()
    output = Path(args.output)
    work, layers, model = demo_expansion(output, "frozen_weights", args.layers)
    layer = decoder_layer_numel(json.loads((model / "config.json").read_text()))
    layered = {key: min(WINDOW_LAYERS[key] * layer, default) for key, default in DEEPSPEED_WINDOW.items()}
    settings = {
        "before": ({"train.frozen_weights": "sharded"}, ds_config(work, "layered", layered)),
        "sharded, wide window": ({"train.frozen_weights": "sharded"}, ds_config(work, "wide", DEEPSPEED_WINDOW)),
        "DeepSpeed persistence": (
            {"train.frozen_weights": "sharded"},
            ds_config(work, "persist_all", {**DEEPSPEED_WINDOW, "stage3_param_persistence_threshold": 1e12}),
        ),
        "replicated": ({"train.frozen_weights": "replicated"}, REPO / "ds_configs" / "zero3.json"),
        "replicated, 2 threads per rank": ({"train.frozen_weights": "replicated", "train.threads": 2}, REPO / "ds_configs" / "zero3.json"),
        "sharded 4 ranks": ({"train.frozen_weights": "sharded"}, ds_config(work, "wide", DEEPSPEED_WINDOW)),
        "hpz 4 ranks": (
            {"train.frozen_weights": "sharded", "train.zeropp": "hpz", "train.hpz_ranks": 2},
            ds_config(work, "wide", DEEPSPEED_WINDOW),
        ),
    }
    if args.runs:
        settings = {name: value for name, value in settings.items() if name in args.runs.split(",")}
    runs = {}
    for name, (extra, config) in settings.items():
        slug = name.replace(",", "").replace(" ", "_")
        # The 4-rank runs keep the global batch (micro batch x ranks) of the others.
        four = {"num_procs": 4, "micro_batch_size": args.micro_batch_size * args.num_procs // 4}
        launch = argparse.Namespace(**{**vars(args), **four}) if name.endswith("4 ranks") else args
        ranks = run_ranks(slug, "adept", model, work, launch, config, {"data.cache_dir": work / "blocks", **extra}, importance_repeats=1)
        runs[name] = {
            **summarise(ranks),
            "ranks": launch.num_procs,
            "gathered_mb_per_step": ranks[0]["gathered_bytes_per_step"] / 1e6,
            "across_groups_mb_per_step": (ranks[0]["gathered_bytes_per_step"] - ranks[0]["subgroup_bytes_per_step"]) / 1e6,
            "layout": f"{ranks[0]['layout']}; {ranks[0]['zeropp']}",
            "threads": ranks[0]["threads"],
        }
    before, replicated = runs["before"], runs["replicated"]
    checks = [
        {
            "measure": "replicated / before: bytes all-gathered per step",
            "value": replicated["gathered_mb_per_step"] / before["gathered_mb_per_step"],
        },
        {"measure": "replicated / before: step time", "value": replicated["step_seconds"] / before["step_seconds"]},
    ]
    for check, target in zip(checks, TARGETS.values()):
        check.update(target=target, met=check["value"] <= target)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": vars(args),
        "layers": layers,
        "runs": runs,
        "checks": checks,
        "seconds": time.time() - started,
    }
    write_result(output, "frozen_weights", result, markdown(result))


if __name__ == "__main__":
    main()
