"""The benchmark suite: ADEPT's step time against its FLOP limit, importance overhead, memory, probe cost.

    python benchmarks/suite.py [--output benchmarks/results] [--timed-steps 4] [--block-size 256]

On the demo model (SmolLM2-135M, 30 layers), side by side in one run, under the same DeepSpeed
ZeRO-3 config, batch and sequence length, with real launcher processes:
1. step time of `adept` (k=4 copies) versus `pt_full`, for the probe's placement (the least
   important layers, mid-network on this model) and for copies in the top third, each beside the
   limit a FLOP count gives (adept_ds/run/flops.py). pt_full also runs with DeepSpeed's default
   parameter window (the whole small model stays gathered: no re-gathering for backward); step
   ratios are taken to the faster of the two pt_full runs;
2. the cost of one unit-importance recompute, as a share of training time at interval 500;
3. peak memory per rank (RSS on CPU, max allocated on GPU) of adept versus pt_full (same config);
4. mask probing with activation reuse versus the naive way (benchmarks/probe_cost.py);
5. tokens per second per rank (and model FLOPs utilisation on GPU, given --peak-tflops).
Writes `<output>/suite-<device>.json` and `.md`, and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from adept_ds.run.ds_config import DEEPSPEED_WINDOW

BENCHMARKS = Path(__file__).parent
REPO = BENCHMARKS.parent
TARGETS = {"step_ratio_over_limit": 1.10, "importance_overhead": 0.03, "memory_ratio": 0.5, "probe_ratio": 0.6}
REFERENCE = "pt_full, DeepSpeed's default window"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import deepspeed

    info["deepspeed"] = deepspeed.__version__
    return info


def placements(original: Path, output: Path, probe_tokens: int, k: int) -> tuple[dict, dict]:
    """The probe's k least important layers, and the k least important within the top third."""
    from adept_ds.model.checkpoint import open_checkpoint
    from adept_ds.pipeline import GENERAL
    from adept_ds.probe.layers import probe_model, rank_layers, read_probe_result

    probe_file = output / "probe.json"
    started = time.perf_counter()
    probe_model(original, GENERAL, probe_file, method="mask", max_tokens=probe_tokens, block_size=128, batch_size=4, show_progress=False)
    probe_seconds = time.perf_counter() - started
    scores = read_probe_result(probe_file)["scores"]
    num_layers = open_checkpoint(original).config["num_hidden_layers"]
    ranked = rank_layers(scores)  # least important first
    top_third = [layer for layer in ranked if layer >= num_layers * 2 // 3]
    layers = {"middle (probe)": sorted(ranked[:k]), "top third": sorted(top_third[:k])}
    return layers, {"tokens": probe_tokens, "seconds": probe_seconds, "scores": scores}


def deepspeed_window_config(output: Path) -> Path:
    """The shipped zero3.json with DeepSpeed's own parameter window instead of adept_ds's layer-sized "auto"."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update(DEEPSPEED_WINDOW)  # what ds_configs/zero3.json leaves to "auto"
    path = output / "zero3_deepspeed_window.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def expanded_model(original: Path, directory: Path, layers: list[int]) -> Path:
    """`original` expanded after `layers` into `directory`, reused when it is already that expansion."""
    from adept_ds.model.expand import expand_checkpoint, read_manifest

    if not (directory / "adept_expansion.json").is_file() or read_manifest(directory)["expanded_layers"] != layers:
        expand_checkpoint(original, directory, layers, overwrite=True, show_progress=False)
    return directory


def write_result(output: Path, name: str, result: dict, table: str) -> None:
    """`<output>/<name>-<device>.json` and `.md`; the Markdown is printed too."""
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    (output / f"{name}-{tag}.json").write_text(json.dumps(result, indent=2))
    (output / f"{name}-{tag}.md").write_text(table)
    print(table)


def add_run_arguments(parser: argparse.ArgumentParser, warmup_steps: int, timed_steps: int, port: int) -> None:
    """The settings `run_ranks` reads from its `args`."""
    parser.add_argument("--num-procs", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps)
    parser.add_argument("--timed-steps", type=int, default=timed_steps)
    parser.add_argument("--port", type=int, default=port)


def run_overrides(
    name: str, method: str, model: Path, output: Path, args, ds_config: Path = REPO / "ds_configs" / "zero3.json", extra: dict | None = None
) -> dict:
    """The run config `run_ranks` trains (also what `adept-ds plan` is asked about by plan_check.py and gpu_check.py)."""
    from adept_ds.pipeline import DOMAIN_TRAIN, GENERAL

    return {
        "model": model,
        "method": method,
        "deepspeed": ds_config,
        "output_dir": output / "runs" / name / "run",
        "data.domain": DOMAIN_TRAIN,
        "data.general": GENERAL,
        "data.block_size": args.block_size,
        "train.micro_batch_size": args.micro_batch_size,
        "train.max_steps": 1000,
        "scheduler.type": "constant",
        "importance.interval": 500,
        **(extra or {}),
    }


def run_ranks(
    name: str,
    method: str,
    model: Path,
    output: Path,
    args,
    ds_config: Path = REPO / "ds_configs" / "zero3.json",
    extra: dict | None = None,
    importance_repeats: int = 2,
    save_checkpoint: bool = False,
    env: dict | None = None,
) -> list[dict]:
    """benchmarks/train_step.py on `args.num_procs` ranks under the DeepSpeed launcher; each rank's record.
    `env`: extra environment variables for the ranks."""
    result_dir = output / "runs" / name
    result_dir.mkdir(parents=True, exist_ok=True)
    overrides = run_overrides(name, method, model, output, args, ds_config, extra)
    command = launcher_command(args.num_procs, args.port)
    command += [str(BENCHMARKS / "train_step.py"), str(result_dir), str(args.warmup_steps), str(args.timed_steps), str(importance_repeats)]
    command += ["--save-checkpoint"] if save_checkpoint else []
    command += [f"{key}={value}" for key, value in overrides.items()]
    print(f"[suite] {name}: {method} on {model.name}, {args.warmup_steps} + {args.timed_steps} steps", flush=True)
    return launch_ranks(name, command, result_dir, args.num_procs, env)


def launcher_command(num_procs: int, port: int) -> list[str]:
    """This environment's DeepSpeed launcher for `num_procs` local ranks on `port`; the script and its arguments follow."""
    return [str(Path(sys.executable).parent / "deepspeed"), "--no_local_rank", "--num_gpus", str(num_procs), "--master_port", str(port)]


def run_launcher(name: str, command: list[str], env: dict | None = None) -> None:
    """Run a launcher `command` (on CPU with DeepSpeed's CPU accelerator); a failure ends the benchmark with the
    tail of the job's output."""
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning", **(env or {}))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")


def launch_ranks(name: str, command: list[str], result_dir: Path, num_procs: int, env: dict | None = None) -> list[dict]:
    """`run_launcher`, then each rank's `result_dir/rank{R}.json`."""
    run_launcher(name, command, env)
    return [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(num_procs)]


def demo_expansion(output: Path, name: str, layers: str) -> tuple[Path, list[int], Path]:
    """(work dir `output/work/name`, the layers, the demo model expanded after `layers` ("12,14,16,17") in work/model)."""
    from adept_ds.model.demo_model import fetch_demo_model

    work = output / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    chosen = [int(layer) for layer in layers.split(",")]
    return work, chosen, expanded_model(fetch_demo_model(), work / "model", chosen)


def summarise(ranks: list[dict]) -> dict:
    # Ranks step in lockstep (collectives): the slowest rank's median is the job's step time.
    step = max(statistics.median(r["step_seconds"]) for r in ranks)
    importance = max(statistics.median(r["importance_seconds"]) for r in ranks) if ranks[0]["importance_seconds"] else None
    peak = "peak_gpu_mb" if ranks[0]["peak_gpu_mb"] is not None else "peak_rss_mb"
    return {
        "step_seconds": step,
        "importance_seconds": importance,
        "peak_memory_mb": max(r[peak] for r in ranks),
        "memory_kind": "GPU max allocated" if peak == "peak_gpu_mb" else "RSS",
        "tokens_per_second_per_rank": ranks[0]["tokens_per_step_per_rank"] / step,
        "trainable_parameters": ranks[0]["trainable_parameters"],
        "parameters": ranks[0]["parameters"],
    }


def fastest_full_step(runs: dict) -> float:
    """The step-time baseline: the faster pt_full, so that no ZeRO-3 window setting flatters ADEPT."""
    return min(runs["pt_full"]["step_seconds"], runs[REFERENCE]["step_seconds"])


def markdown(result: dict) -> str:
    runs = result["runs"]
    base = runs["pt_full"]
    fastest_full = fastest_full_step(runs)
    lines = [
        f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores)"
        + (f", GPU {result['machine']['gpu']}" if "gpu" in result["machine"] else "")
        + f"; {result['settings']['num_procs']} ranks, ZeRO-3, {result['settings']['micro_batch_size']} x {result['settings']['block_size']} "
        f"tokens per rank per step; {result['date']}; {result['seconds']:.0f} s in all. Step ratios are to the faster pt_full; "
        "memory ratios to pt_full under the same (shipped) config.",
        "",
        "| run | trainable / all params | step s | vs faster pt_full | FLOP limit | ratio / limit | tokens/s/rank | peak MB | memory vs pt_full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        ratio = run["step_seconds"] / fastest_full
        limit = run.get("flop_limit")
        lines.append(
            f"| {name}{' layers ' + str(run['layers']) if 'layers' in run else ''} | "
            f"{run['trainable_parameters'] / 1e6:.1f}M / {run['parameters'] / 1e6:.1f}M | {run['step_seconds']:.2f} | {ratio:.3f} | "
            f"{f'{limit:.3f}' if limit else '-'} | {f'{ratio / limit:.3f}' if limit else '-'} | {run['tokens_per_second_per_rank']:.0f} | "
            f"{run['peak_memory_mb']:.0f} | {run['peak_memory_mb'] / base['peak_memory_mb']:.3f} |"
        )
    lines += ["", "| measure | value | target |", "|---|---|---|"]
    for check in result["checks"]:
        lines.append(f"| {check['measure']} | {check['value']:.4f} | {check['target']} ({'met' if check['met'] else 'NOT met'}) |")
    lines += ["", "| probe model | naive s | reuse s | reuse / naive | predicted from unit costs |", "|---|---|---|---|---|"]
    for probe in result["probe_cost"]:
        lines.append(
            f"| {probe['model']} | {probe['naive_s']:.2f} | {probe['reuse_s']:.2f} | {probe['ratio']:.3f} | {probe['floor']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def sample_train_flops(model: Path, method: str, block_size: int) -> int:
    """The FLOPs one `block_size`-token sample costs a training step of `method` on `model` (adept_ds/run/flops.py)."""
    from adept_ds.run.config import load_run_config
    from adept_ds.run.flops import sample_flops
    from adept_ds.run.plan import model_shape

    return sample_flops(model_shape(load_run_config(None, [f"model={model}", f"method={method}"])), block_size).train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(BENCHMARKS / "results"))
    add_run_arguments(parser, warmup_steps=2, timed_steps=4, port=29731)
    parser.add_argument("--probe-tokens", type=int, default=1024, help="tokens for the probe that picks the placement")
    parser.add_argument("--probe-models", default="demo,llama-30L", help="models for the probe-cost measurement")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's peak dense TFLOP/s, for model FLOPs utilisation")
    args = parser.parse_args()

    sys.path.insert(0, str(BENCHMARKS))
    from probe_cost import measure, random_llama_30l
    from transformers import AutoModelForCausalLM

    from adept_ds.model.demo_model import fetch_demo_model

    started = time.time()
    output = Path(args.output)
    work = output / "work"
    work.mkdir(parents=True, exist_ok=True)
    original = fetch_demo_model()

    layers, probe = placements(original, work, args.probe_tokens, k=4)
    runs = {"pt_full": summarise(run_ranks("pt_full", "pt_full", original, work, args))}
    # With the whole small model gathered, pt_full never re-gathers a layer for backward. The faster of the
    # two pt_full runs is the step-time baseline, so ADEPT's ratio is not flattered by the window.
    runs[REFERENCE] = summarise(run_ranks("pt_full_deepspeed_window", "pt_full", original, work, args, deepspeed_window_config(work)))
    for label, chosen in layers.items():
        expanded = expanded_model(original, work / "models" / label.split()[0], chosen)
        run = summarise(run_ranks(f"adept_{label.split()[0]}", "adept", expanded, work, args))
        run["layers"] = chosen
        run["flop_limit"] = sample_train_flops(expanded, "adept", args.block_size) / sample_train_flops(
            original, "pt_full", args.block_size
        )
        runs[f"adept {label}"] = run

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe_models = {"demo": lambda: AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32), "llama-30L": random_llama_30l}
    probe_cost = [measure(name, probe_models[name](), 1, 256, 1, device) for name in args.probe_models.split(",") if name]

    base = runs["pt_full"]
    fastest_full = fastest_full_step(runs)

    def check(measure: str, value: float, target: str) -> dict:
        return {"measure": measure, "value": value, "target": f"<= {TARGETS[target]}", "met": value <= TARGETS[target]}

    checks = []
    for name, run in runs.items():
        if "flop_limit" in run:
            ratio = run["step_seconds"] / fastest_full
            checks.append(
                check(f"{name}: step ratio (vs the faster pt_full) / FLOP limit", ratio / run["flop_limit"], "step_ratio_over_limit")
            )
            overhead = run["importance_seconds"] / (run["importance_seconds"] + 500 * run["step_seconds"])
            checks.append(check(f"{name}: importance overhead at interval 500", overhead, "importance_overhead"))
            checks.append(check(f"{name}: peak memory vs pt_full", run["peak_memory_mb"] / base["peak_memory_mb"], "memory_ratio"))
    for probe_run in probe_cost:
        checks.append(check(f"probe reuse / naive ({probe_run['model']})", probe_run["ratio"], "probe_ratio"))
    if args.peak_tflops and torch.cuda.is_available():
        tokens = base["tokens_per_second_per_rank"]
        base["mfu"] = tokens / args.block_size * sample_train_flops(original, "pt_full", args.block_size) / (args.peak_tflops * 1e12)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": vars(args),
        "placement_probe": probe,
        "runs": runs,
        "probe_cost": probe_cost,
        "checks": checks,
        "seconds": time.time() - started,
    }
    write_result(output, "suite", result, markdown(result))


if __name__ == "__main__":
    main()
