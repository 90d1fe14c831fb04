"""Peak memory of `adept-ds expand` on the demo model: single-file vs sharded checkpoint.

Each expansion runs in a fresh process; we report its peak RSS beside the RSS it had before the
first tensor was read (Python + torch + safetensors), the model size and the largest shard.
Streaming shard by shard means the growth over the baseline tracks the largest shard, not the model.

    python benchmarks/expand_memory.py [--layers 12,14,16,18] [--shard-mb 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from adept_ds.model.expand import expand_checkpoint

def high_water_kb():  # VmHWM belongs to this process image (ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])

baseline = high_water_kb()
expand_checkpoint(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")], show_progress=False)
peak = high_water_kb()
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak}))
"""


def measure(model: Path, output: Path, layers: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(model), str(output), layers], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_sharded_copy(model: Path, target: Path, shard_mb: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(target, max_shard_size=f"{shard_mb}MB")
    AutoTokenizer.from_pretrained(model).save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="12,14,16,18")
    parser.add_argument("--shard-mb", type=int, default=50)
    args = parser.parse_args()

    from adept_ds.model.demo_model import fetch_demo_model

    model = fetch_demo_model()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        variants = {"single file": model, f"{args.shard_mb} MB shards": make_sharded_copy(model, work / "sharded", args.shard_mb)}
        for name, source in variants.items():
            shards = [f.stat().st_size for f in source.glob("*.safetensors")]
            memory = measure(source, work / f"out-{len(rows)}", args.layers)
            rows.append(
                {
                    "checkpoint": name,
                    "model_mb": sum(shards) / 2**20,
                    "largest_shard_mb": max(shards) / 2**20,
                    "baseline_rss_mb": memory["baseline_kb"] / 1024,
                    "peak_rss_mb": memory["peak_kb"] / 1024,
                    "growth_mb": (memory["peak_kb"] - memory["baseline_kb"]) / 1024,
                }
            )
    print(f"expand demo model (SmolLM2-135M, bf16), layers {args.layers}")
    print("| checkpoint | model MB | largest shard MB | baseline RSS MB | peak RSS MB | growth MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['checkpoint']} | {row['model_mb']:.0f} | {row['largest_shard_mb']:.0f} | {row['baseline_rss_mb']:.0f} "
            f"| {row['peak_rss_mb']:.0f} | {row['growth_mb']:.0f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
