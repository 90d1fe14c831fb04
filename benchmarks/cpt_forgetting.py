"""ADEPT versus PT-Full on the demo model: does the domain loss fall, and how far does the general loss move?

Runs on this machine with 2 CPU ranks (DeepSpeed ZeRO-3, gloo), the bundled corpora and the shipped
run configs: probe (mask) -> expand k=4 -> train `adept` on the expanded model and `pt_full` on the
original, same data, steps, batch and LR schedule -> export -> losses before and after.

    python benchmarks/cpt_forgetting.py [--steps 40] [--work runs/bench_cpt] [--num-gpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "adept_ds" / "assets"


def run(command: list[str], **env) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run(
        [str(c) for c in command], check=True, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), **env}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", default="runs/bench_cpt")
    parser.add_argument("--num-gpus", type=int, default=2)
    parser.add_argument("--eval-blocks", type=int, default=64)
    args = parser.parse_args()

    from adept_ds.demo_model import cache_root, fetch_demo_model
    from adept_ds.evaluate import evaluate_losses

    work = Path(args.work).absolute()
    original = fetch_demo_model()
    python, deepspeed = sys.executable, Path(sys.executable).parent / "deepspeed"
    general, domain_train, domain_test = ASSETS / "general_en.jsonl", ASSETS / "math_train.jsonl", ASSETS / "math_test.jsonl"
    probe = work / "probe.json"
    if not probe.is_file():
        run(
            [
                python,
                "-m",
                "adept_ds.cli",
                "probe",
                "--model",
                original,
                "--data",
                general,
                "--output",
                probe,
                "--max-tokens",
                16384,
                "--block-size",
                128,
            ]
        )
    expanded = work / "expanded"
    if not (expanded / "adept_expansion.json").is_file():
        run([python, "-m", "adept_ds.cli", "expand", "--model", original, "--probe", probe, "--k", 4, "--output", expanded, "--overwrite"])

    runs = {"adept": ("demo_adept.yaml", expanded), "pt_full": ("demo_pt_full.yaml", original)}
    for method, (config, model) in runs.items():
        output = work / method
        if not (output / "final" / "config.json").is_file():
            run(
                [
                    deepspeed,
                    "--no_local_rank",
                    "--num_gpus",
                    args.num_gpus,
                    REPO / "launch" / "train.py",
                    "--config",
                    REPO / "launch" / "configs" / config,
                    f"model={model}",
                    f"output_dir={output}",
                    f"train.max_steps={args.steps}",
                    f"train.save_interval={args.steps}",
                    f"data.domain={domain_train}",
                    f"data.general={general}",
                ]
            )

    corpora = {"general": general, "domain": domain_test}
    cache = cache_root() / "blocks"
    before = evaluate_losses(original, corpora, 128, args.eval_blocks, cache)
    rows = {"before": before}
    for method in runs:
        rows[method] = evaluate_losses(work / method / "final", corpora, 128, args.eval_blocks, cache)
    chosen = json.loads((expanded / "adept_expansion.json").read_text())["expanded_layers"]
    print(
        f"\ndemo model, {args.steps} steps x {2 * args.num_gpus} blocks of 128 tokens, 2 CPU ranks ZeRO-3; ADEPT expanded layers {chosen}"
    )
    print("| model | general loss | change | domain (held-out) loss | change |")
    print("|---|---|---|---|---|")
    for name, result in rows.items():
        g, d = result["general"]["loss"], result["domain"]["loss"]
        dg, dd = g - before["general"]["loss"], d - before["domain"]["loss"]
        print(f"| {name} | {g:.4f} | {dg:+.4f} | {d:.4f} | {dd:+.4f} |")
    print(json.dumps({"steps": args.steps, "expanded_layers": chosen, "results": rows}))


if __name__ == "__main__":
    main()
