"""The demo's first training steps, exactly: a fingerprint of the code path from probe to optimizer step.

Runs the demo's stages as `adept-ds demo` does (the offline demo model, the mask probe on the bundled general
corpus, expansion of the k=4 least important layers, ADEPT training under the `deepspeed` launcher on 2 CPU ranks,
ZeRO-3, with the demo's run config for 40 steps) but stops training after `--steps` steps, without export. Prints
the probe scores, every step's loss and the validation losses as exact hexadecimal floats, and one SHA-256 of
them all: a refactor that changes nothing prints the same digest.

    python benchmarks/demo_losses.py --output /tmp/demo_losses [--steps 4] [--probe-tokens 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="a scratch directory (replaced)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--probe-tokens", type=int, default=1024)
    args = parser.parse_args()

    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.model.expand import expand_checkpoint
    from adept_ds.pipeline import GENERAL, train_method
    from adept_ds.probe.layers import layers_from_probe, probe_model, read_probe_result
    from adept_ds.runtime.run_log import read_records

    output = Path(args.output).absolute()
    shutil.rmtree(output, ignore_errors=True)
    original = fetch_demo_model()
    probe_file = output / "probe.json"
    probe_model(original, GENERAL, probe_file, method="mask", max_tokens=args.probe_tokens, block_size=128, batch_size=4)
    checkpoint = open_checkpoint(original)
    layers = layers_from_probe(probe_file, 4, fingerprint_checkpoint(checkpoint), checkpoint.config["num_hidden_layers"])
    expanded = output / "adept_expanded"
    expand_checkpoint(original, expanded, layers, overwrite=True, show_progress=False)
    run = output / "run"
    extra = {"train.max_steps": args.steps, "train.save_interval": args.steps, "train.export": False}
    train_method("adept", expanded, run, probe_file, steps=40, num_procs=2, extra=extra)

    scores = read_probe_result(probe_file)["scores"]
    losses = [record["loss"] for record in read_records(run, "train")]
    # without "seconds": only what the computation decides
    validation = [{"step": r["step"], **{k: v["loss"] for k, v in r["validation"].items()}} for r in read_records(run, "validation")]
    lines = [f"probe scores: {' '.join(float(s).hex() for s in scores)}", f"expanded layers: {layers}"]
    lines += [f"step {step}: loss {loss!r} ({float(loss).hex()})" for step, loss in enumerate(losses, 1)]
    lines += [f"validation: {json.dumps(record, sort_keys=True)}" for record in validation]
    print("\n".join(lines))
    print(f"digest: {hashlib.sha256(chr(10).join(lines).encode()).hexdigest()}")


if __name__ == "__main__":
    main()
