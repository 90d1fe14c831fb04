"""`adept-ds plan` against real runs (issue 14): random Llamas of ~0.1, 0.5 and 1.5B, 2 CPU ranks, ZeRO-3.

    python benchmarks/plan_check.py [--sizes tiny,0.1b,0.1b_ckpt,0.5b,1.5b] [--work benchmarks/results/work/plan]

Each size is a random Llama in bf16 (benchmarks/scale.py's builder), expanded by 2 ADEPT copies, trained
under the launcher (benchmarks/train_step.py: 1 warm-up + 2 timed steps, 1 importance pass, then a
checkpoint) with the shipped zero3.json (fp32 on CPU). The planner is asked about the same run config
(`adept-ds plan --device cpu --json`) and compared:
- checkpoint: the predicted bytes per rank against the tensor bytes in each rank's optimizer file (exact),
  and against the file sizes (pickle adds a few KB);
- memory: the predicted peak of the training steps and of the importance pass against the measured peak
  RSS of that phase (the peak is reset when the phase starts) less the RSS after the imports, the larger rank.
`tiny` (2 layers of width 64) measures what a rank holds beyond the modelled terms: `plan.CPU_RUNTIME_BYTES`
is that figure. The activation-heavy `0.1b` runs (2 x 1024 tokens) check the activation model with and
without checkpointing. Writes benchmarks/results/plan_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

LLAMA = {"num_attention_heads": 16, "num_key_value_heads": 4}
MMAP_THRESHOLD = 128 * 1024
"""glibc serves allocations from this size up with their own mappings and returns them on free, so that a rank's
RSS follows its live memory, as `torch.cuda.max_memory_allocated` does on a GPU. glibc's default (a threshold that
rises to 32 MB after frees) keeps freed heap resident: --glibc-default measures that too."""
SIZES = {
    # name: (shape, copied after these original layers, micro batch, block size, activation checkpointing)
    "tiny": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        [0],
        1,
        64,
        False,
    ),
    "0.1b": ({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, **LLAMA}, [1, 6], 2, 1024, False),
    "0.1b_ckpt": ({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, **LLAMA}, [1, 6], 2, 1024, True),
    "0.5b": ({"hidden_size": 1280, "intermediate_size": 3584, "num_hidden_layers": 20, **LLAMA}, [4, 12], 1, 256, False),
    "1.5b": ({"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 32, **LLAMA}, [10, 21], 1, 256, False),
}


def run_settings(micro: int, block: int) -> SimpleNamespace:
    """What suite.run_ranks reads: 2 ranks, 1 warm-up and 2 timed steps."""
    from adept_ds.runtime.distributed import free_port

    return SimpleNamespace(num_procs=2, block_size=block, micro_batch_size=micro, warmup_steps=1, timed_steps=2, port=free_port())


def planned(settings: dict) -> dict:
    """The plan for `settings` at the memory the run plans its layout against (train.memory_gb), so both choose
    the same frozen-weights layout and ZeRO-3 window."""
    command = [sys.executable, "-m", "adept_ds.cli", "plan", "--device", "cpu", "--nodes", "1", "--gpus-per-node", "2", "--json"]
    command += ["--gpu-memory-gb", str(settings["train.memory_gb"])]
    command += [f"{key}={value}" for key, value in settings.items()]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def optimizer_tensor_bytes(path: Path) -> int:
    """Bytes of every tensor in one rank's ZeRO optimizer file (what the planner predicts; the rest is pickle)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    total, stack = 0, [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


RANK_MEMORY_GB = 11.0
"""Memory per rank the runs and their plans choose a layout against (this machine's RAM / 2 ranks, rounded down)."""


def check_size(name: str, work: Path, glibc_default: bool, frozen_weights: str) -> dict:
    from scale import build_model

    from adept_ds.model.expand import expand_checkpoint

    shape, copied, micro, block, checkpointing = SIZES[name.removesuffix("_glibc")]
    base_name = name.removesuffix("_ckpt")
    original = build_model(work / "models" / base_name, **shape)
    expanded = work / "models" / f"{base_name}_expanded"
    if not (expanded / "adept_expansion.json").is_file():
        expand_checkpoint(original, expanded, copied, overwrite=True, show_progress=False)
    from suite import run_overrides, run_ranks

    run_name = name + ("_glibc" if glibc_default else "") + ("" if frozen_weights == "auto" else f"_{frozen_weights}")
    shutil.rmtree(work / "runs" / run_name, ignore_errors=True)
    args = run_settings(micro, block)
    extra = {
        "data.cache_dir": work / "runs" / "blocks",
        "train.activation_checkpointing": checkpointing,
        "importance.batch_size": micro,
        "train.memory_gb": RANK_MEMORY_GB,
        "train.frozen_weights": frozen_weights,
    }
    plan = planned(run_overrides(run_name, "adept", expanded, work, args, extra=extra))
    env = {} if glibc_default else {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    print(f"[plan_check] {run_name}: training 3 steps, 1 importance pass, 1 checkpoint on 2 ranks", flush=True)
    ranks = run_ranks(run_name, "adept", expanded, work, args, extra=extra, importance_repeats=1, save_checkpoint=True, env=env)
    mb = 2**20
    checkpoint = Path(ranks[0]["checkpoint"])
    files = sorted(checkpoint.glob("*optim_states.pt"))
    result = {
        "layout": ranks[0]["layout"],
        "parameters": ranks[0]["parameters"],
        "trainable_parameters": ranks[0]["trainable_parameters"],
        "micro_batch": micro,
        "block_size": block,
        "activation_checkpointing": checkpointing,
        "checkpoint_predicted_per_rank": plan["checkpoint_bytes_per_rank"],
        "checkpoint_tensor_bytes": [optimizer_tensor_bytes(path) for path in files],
        "checkpoint_file_bytes": [path.stat().st_size for path in files],
    }
    for phase, key in (("train", "steps_peak"), ("importance", "importance_peak")):
        grown = max(rank["rss_mb"][key] - rank["rss_mb"]["imports"] for rank in ranks) * mb
        result[phase] = {"predicted": plan[phase]["total"], "measured_growth": grown, "terms": plan[phase]}
    return result


def markdown(results: dict) -> str:
    from adept_ds.run.plan import CPU_RUNTIME_BYTES

    mb = 2**20
    lines = [
        f"2 CPU ranks, ZeRO-3 (zero3.json, fp32), method adept (2 copies; tiny: 1); CPU_RUNTIME_BYTES = {CPU_RUNTIME_BYTES / mb:.0f} MB "
        "is added to every prediction. Measured: peak RSS of the phase less the RSS after the imports, the larger rank, with "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (RSS follows live memory; rows marked _glibc: glibc's default, which keeps freed heap).",
        "",
        "| size | layout | params | trainable | tokens / micro-batch | ckpt | checkpoint per rank: predicted / tensors / file | "
        "train MB: predicted / measured / ratio | importance MB: predicted / measured / ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["sizes"].items():
        cells = []
        for phase in ("train", "importance"):
            predicted = r[phase]["predicted"] + CPU_RUNTIME_BYTES
            cells.append(f"{predicted / mb:.0f} / {r[phase]['measured_growth'] / mb:.0f} / {predicted / r[phase]['measured_growth']:.2f}")
        exact = "exact" if all(b == r["checkpoint_predicted_per_rank"] for b in r["checkpoint_tensor_bytes"]) else "DIFFERS"
        lines.append(
            f"| {name} | {r.get('layout', 'sharded, ~3-layer window (before train.frozen_weights)').split(':')[0]} | {r['parameters'] / 1e6:.0f}M | {r['trainable_parameters'] / 1e6:.1f}M | {r['micro_batch']} x {r['block_size']} | "
            f"{'on' if r['activation_checkpointing'] else 'off'} | {r['checkpoint_predicted_per_rank']:,} / "
            f"{r['checkpoint_tensor_bytes'][0]:,} ({exact}) / {r['checkpoint_file_bytes'][0]:,} | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "results" / "work" / "plan"))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument(
        "--glibc-default", action="store_true", help="measure under glibc's default malloc settings (recorded as SIZE_glibc)"
    )
    parser.add_argument(
        "--frozen-weights",
        default="auto",
        choices=("auto", "sharded", "replicated"),
        help="train.frozen_weights (recorded as SIZE_sharded ...)",
    )
    args = parser.parse_args()
    started = time.time()
    sizes = [size for size in args.sizes.split(",") if size]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    output = Path(args.output)
    record = output / "plan_check.json"
    results = json.loads(record.read_text()) if record.is_file() else {"sizes": {}}
    for name in sizes:
        row = name + ("_glibc" if args.glibc_default else "") + ("" if args.frozen_weights == "auto" else f"_{args.frozen_weights}")
        results["sizes"][row] = check_size(name, Path(args.work), args.glibc_default, args.frozen_weights)
        results["date"], results["seconds"] = time.strftime("%Y-%m-%d"), time.time() - started
        record.write_text(json.dumps(results, indent=2))  # after every size: a long run keeps what it measured
    table = markdown(results)
    (output / "plan_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
