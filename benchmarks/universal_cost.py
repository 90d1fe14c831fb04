"""What a resume at another world size and the guard's rollback export cost, against checkpoint size.

    python benchmarks/universal_cost.py [--sizes 0.5b 1.5b] [--work benchmarks/results/work/universal]

For each size, a random-weight Llama in bf16 (0.5b: hidden 1536, 16 layers, adept with 8 copies; 1.5b: hidden 2048,
32 layers, adept with 4 copies; pt_full at 0.5B and 8 copies at 1.5B were OOM-killed on this 24 GiB machine: rank 0
reached 11 GiB), one training step on 2 CPU ranks under ZeRO-3 with a
checkpoint, then, each in a fresh process:
- the universal conversion (universal.convert: DeepSpeed's ds_to_universal) with 1 worker and with
  universal.conversion_workers' count: seconds, checkpoint bytes, MB/s, the largest process's peak RSS against
  the largest rank file (the worker memory rule);
- the export of that checkpoint (what the guard's rollback runs): seconds and bytes written.
Writes benchmarks/results/universal_cost.{json,md}. Both run outside any collective (file_lock.py): their time
is bounded by the job's time limit, not by train.timeout_minutes; the figures size that time at 70B.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCHMARKS))

SIZES = {
    "0.5b": {
        "shape": {
            "hidden_size": 1536,
            "intermediate_size": 4096,
            "num_hidden_layers": 16,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
        },
        "method": "adept_no_stage2",  # adept's trainable state, without importance passes
        "copies": [1, 3, 5, 7, 9, 11, 13, 15],
    },
    "1.5b": {
        "shape": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
        },
        "method": "adept_no_stage2",  # adept's trainable state, without importance passes
        "copies": [7, 15, 23, 30],
    },
}

MEASURE = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
{imports}
started = time.perf_counter()
{work}
seconds = time.perf_counter() - started
peak = lambda who: resource.getrusage(who).ru_maxrss * 1024
print("RESULT", json.dumps({{"seconds": seconds, "self_peak": peak(resource.RUSAGE_SELF), "child_peak": peak(resource.RUSAGE_CHILDREN)}}))
"""


def measured(imports: str, work: str) -> dict:
    """Seconds and peak RSS (this process, its largest worker) of `work` in a fresh process."""
    code = MEASURE.format(repo=str(REPO), imports=imports, work=work)
    env = {"DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"measured process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.split("RESULT")[-1])


def small_window_config(work: Path) -> Path:
    """zero3.json with a 50M-element reduce bucket and gather window: pt_full at 0.5B on 2 CPU ranks then needs
    ~6 GiB per rank instead of ~9 (`adept-ds plan --device cpu`), which a 24 GiB machine holds beside other work.
    The checkpoint (what this measures) is the same."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update(reduce_bucket_size=5e7, stage3_max_live_parameters=5e7, stage3_prefetch_bucket_size=5e7)
    path = work / "zero3_small_window.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def measure_size(name: str, work: Path) -> dict:
    from scale import build_model, train

    from adept_ds.model.expand import expand_checkpoint
    from adept_ds.training.checkpoints import newest_complete
    from adept_ds.training.universal import conversion_workers

    spec = SIZES[name]
    original = build_model(work / f"llama_{name}", **spec["shape"])
    model = original
    if spec["copies"]:
        model = work / f"expanded_{name}"
        if not (model / "adept_expansion.json").is_file():
            expand_checkpoint(original, model, spec["copies"], overwrite=True, show_progress=False)
    corpus = work / "domain.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"numbers {i} and words {i * 7} " * 8}) + "\n" for i in range(256)))
    run = work / f"run_{name}"
    result = {"shape": spec["shape"], "method": spec["method"], "copies": spec["copies"]}
    if newest_complete(run / "checkpoints")[0] is None:
        shutil.rmtree(run, ignore_errors=True)
        # fp32 on CPU: a whole 1.5B backbone per rank would not fit 24 GiB twice, so the frozen weights are sharded
        extra = {"deepspeed": small_window_config(work), "train.frozen_weights": "sharded"}
        result["train_seconds"] = train(model, run, corpus, spec["method"], max_steps=1, extra=extra)
    checkpoint = newest_complete(run / "checkpoints")[0]
    rank_files = sorted(checkpoint.glob("*optim_states.pt"))
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    result["largest_rank_file_bytes"] = max(f.stat().st_size for f in rank_files)
    print(f"[{name}] checkpoint {result['checkpoint_bytes'] / 2**30:.2f} GiB in {len(rank_files)} rank files", flush=True)

    result["conversion"] = {}
    for workers in sorted({1, conversion_workers(checkpoint)}):
        for leftover in checkpoint.parent.glob("universal-*"):
            shutil.rmtree(leftover)
        figures = measured(
            "from pathlib import Path; from adept_ds.training.universal import convert",
            f"convert(Path({str(checkpoint.parent)!r}), {checkpoint.name!r}, {workers})",
        )
        universal = checkpoint.parent / f"universal-{checkpoint.name}"
        figures["universal_bytes"] = sum(f.stat().st_size for f in universal.rglob("*") if f.is_file())
        figures["mb_per_s"] = result["checkpoint_bytes"] / figures["seconds"] / 1e6
        result["conversion"][workers] = figures
        print(f"[{name}] conversion, {workers} workers: {figures['seconds']:.1f} s, {figures['mb_per_s']:.0f} MB/s", flush=True)

    export = work / f"export_{name}"
    shutil.rmtree(export, ignore_errors=True)
    figures = measured(
        "from adept_ds.training.export import export_checkpoint",
        f"export_checkpoint({str(checkpoint.parent)!r}, {checkpoint.name!r}, {str(model)!r}, {str(export)!r}, show_progress=False)",
    )
    figures["bytes"] = sum(f.stat().st_size for f in export.rglob("*") if f.is_file())
    figures["mb_per_s"] = figures["bytes"] / figures["seconds"] / 1e6
    result["export"] = figures
    print(f"[{name}] export: {figures['seconds']:.1f} s for {figures['bytes'] / 2**30:.2f} GiB", flush=True)
    shutil.rmtree(export, ignore_errors=True)
    return result


def markdown(results: dict) -> str:
    lines = [
        "| size | method | checkpoint | workers | conversion | MB/s | peak RSS (largest process) / largest rank file | export |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["sizes"].items():
        method = f"{r['method']}, k={len(r['copies'])}" if r["copies"] else r["method"]
        for workers, c in r["conversion"].items():
            peak = max(c["self_peak"], c["child_peak"])
            lines.append(
                f"| {name} | {method} | {r['checkpoint_bytes'] / 2**30:.2f} GiB | "
                f"{workers} | {c['seconds']:.1f} s | {c['mb_per_s']:.0f} | {peak / 2**30:.2f} / {r['largest_rank_file_bytes'] / 2**30:.2f} GiB | "
                f"{r['export']['seconds']:.1f} s ({r['export']['bytes'] / 2**30:.2f} GiB written) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--work", type=Path, default=RESULTS / "work" / "universal")
    args = parser.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": "CPU, 2 ranks, ZeRO-3, fp32", "date": time.strftime("%Y-%m-%d"), "sizes": {}}
    for name in args.sizes:
        results["sizes"][name] = measure_size(name, work)
        (RESULTS / "universal_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "universal_cost.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
