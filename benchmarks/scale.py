"""Checkpoints, export and the mask probe at the largest size this machine holds: a ~1.5B random Llama in bf16.

    python benchmarks/scale.py [--layers 32] [--work benchmarks/results/work/scale] [--old-export]

Builds a random-weight Llama (hidden 2048, MLP 5632, 32 layers, vocab 32000: 1.5B parameters) stored in
bf16 across 500 MB shards, expands 2 layers (ADEPT copies), trains 2 steps on 2 CPU ranks under ZeRO-3
(fp32 compute: this CPU has no bf16 matmul units) with a checkpoint at the end, and measures:
- checkpoint bytes on disk against the trainable state (fp32 master + Adam's two moments = 12 B/param);
- the export's peak RSS (fresh process, peak reset after the imports) against the bound
  largest shard + trained tensors in fp32 + the one tensor being assembled; with --old-export also the
  export before streaming (commit f890e06: the whole model loaded in fp32);
- the mask probe's recorded-activation peak per rank, all layers at once (before) against chunks (after).
Writes benchmarks/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
COPIED = [10, 21]

MEASURE = r"""
import json, re, sys
def status(key):
    return 1024 * int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
{imports}
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := RSS now, after the imports
start = status("VmRSS")
{work}
print("RESULT", json.dumps({{"start": start, "peak": status("VmHWM")}}))
"""


def rss_during(imports: str, work: str) -> dict:
    """RSS after `imports` and peak RSS while `work` ran, in a fresh process (bytes)."""
    code = MEASURE.format(imports=imports, work=work)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    if result.returncode != 0:
        raise SystemExit(f"measured process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.split("RESULT")[-1])


def _env() -> dict:
    import os

    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 4}


def build_model(path: Path, max_shard_size: str = "500MB", **shape) -> Path:
    """A random Llama in bf16 (vocab 32000, untied head), sharded like a hub checkpoint; built once, then reused."""
    if (path / "config.json").is_file() and any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import build_byte_tokenizer

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path, max_shard_size=max_shard_size)
    build_byte_tokenizer().save_pretrained(path)
    return path


def train(model: Path, output: Path, corpus: Path, method: str = "adept_no_stage2", max_steps: int = 2, extra: dict | None = None) -> float:
    """`max_steps` steps of `method` on 2 CPU ranks under DeepSpeed's launcher, a checkpoint at the end; seconds.
    The default method has adept's trainable state, without importance passes. `extra`: more overrides."""
    from suite import launcher_command, run_launcher

    from adept_ds.runtime.distributed import free_port

    overrides = {
        "model": model,
        "method": method,
        "deepspeed": REPO / "ds_configs" / "zero3.json",
        "output_dir": output,
        "data.domain": corpus,
        "data.block_size": 32,
        "data.cache_dir": output.parent / "blocks",
        "train.max_steps": max_steps,
        "train.save_interval": 0,
        "train.micro_batch_size": 1,
        "train.export": False,
        "scheduler.warmup_steps": 1,
        **(extra or {}),
    }
    command = [*launcher_command(2, free_port()), "--module", "adept_ds.train", *[f"{key}={value}" for key, value in overrides.items()]]
    started = time.perf_counter()
    run_launcher(f"training {method} on {model.name}", command, env={"PYTHONPATH": str(REPO)})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--work", type=Path, default=RESULTS / "work" / "scale")
    parser.add_argument("--old-export", action="store_true", help="also measure the export before streaming (needs ~4x the model in RAM)")
    args = parser.parse_args()

    from adept_ds.model.checkpoint import open_checkpoint
    from adept_ds.model.expand import expand_checkpoint
    from adept_ds.training.checkpoints import newest_complete
    from tests.model_checks import load_state

    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    original = build_model(work / f"llama_{args.layers}l_bf16", num_hidden_layers=args.layers, **SHAPE)
    expanded = work / "expanded"
    if not (expanded / "adept_expansion.json").is_file():
        expand_checkpoint(original, expanded, COPIED, overwrite=True, show_progress=False)
    checkpoint = open_checkpoint(expanded)
    shards = {shard: (expanded / shard).stat().st_size for shard in checkpoint.shard_tensors}
    state = load_state(expanded)
    total_params = sum(t.numel() for t in state.values())
    copies = tuple(f"model.layers.{layer}." for layer in (COPIED[0] + 1, COPIED[1] + 2))
    trained = [t.numel() for name, t in state.items() if name.startswith(copies)]
    del state
    results = {
        "model": {"parameters": total_params, "layers": args.layers + 2, "bytes": sum(shards.values()), "shards": len(shards)},
        "largest_shard_bytes": max(shards.values()),
        "trainable_parameters": sum(trained),
    }
    print(f"model: {total_params / 1e9:.2f}B parameters in {len(shards)} bf16 shards, {sum(trained) / 1e6:.1f}M trainable", flush=True)

    corpus = work / "domain.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"numbers {i} and words {i * 7} " * 8}) + "\n" for i in range(256)))
    run = work / "run"
    if newest_complete(run / "checkpoints")[0] is None:
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        results["train_seconds"] = train(expanded, run, corpus)
    tag = newest_complete(run / "checkpoints")[0]
    written = sum(f.stat().st_size for f in tag.iterdir())
    trainable_state = 12 * sum(trained)
    frozen_fp32 = 4 * (total_params - sum(trained))  # what the partitions of the frozen weights added before
    results["checkpoint"] = {"bytes": written, "trainable_state_bytes": trainable_state, "ratio": written / trainable_state}
    results["checkpoint"]["before_bytes_estimate"] = written + frozen_fp32
    print(f"checkpoint: {written / 2**30:.3f} GiB = {written / trainable_state:.4f} x the trainable state", flush=True)

    imports = "import torch, safetensors.torch, deepspeed.utils.zero_to_fp32, adept_ds.training.export"
    work_line = f"adept_ds.training.export.export_checkpoint({str(run / 'checkpoints')!r}, None, {str(expanded)!r}, {str(work / 'export')!r}, show_progress=False)"
    measured = rss_during(imports, work_line)
    bound = max(shards.values()) + 4 * sum(trained) + 1.5 * 4 * max(trained)
    results["export"] = {
        "start_rss": measured["start"],
        "peak_growth_bytes": measured["peak"] - measured["start"],
        "bound_bytes": bound,
        "within_bound": measured["peak"] - measured["start"] <= bound + 16 * 2**20,
    }
    print(f"export: peak growth {(measured['peak'] - measured['start']) / 2**30:.2f} GiB, bound {bound / 2**30:.2f} GiB", flush=True)
    if args.old_export:
        old = work / "export_before.py"
        text = subprocess.run(["git", "show", "f890e06:adept_ds/export.py"], capture_output=True, text=True, check=True).stdout
        for moved, now in (
            ("checkpoint", "model.checkpoint"),
            ("outputs", "runtime.outputs"),
            ("train_checkpoints", "training.checkpoints"),
        ):
            text = text.replace(f"from adept_ds.{moved} import", f"from adept_ds.{now} import")  # where those modules live now
        old.write_text(text)
        imports_old = f"import sys; sys.path.insert(0, {str(work)!r}); import torch, transformers, export_before"
        line = f"export_before.export_checkpoint({str(run / 'checkpoints')!r}, None, {str(expanded)!r}, {str(work / 'export_old')!r})"
        before = rss_during(imports_old, line)
        results["export"]["before_peak_growth_bytes"] = before["peak"] - before["start"]
        print(f"export before streaming: peak growth {(before['peak'] - before['start']) / 2**30:.2f} GiB", flush=True)

    results["probe"] = probe_memory(expanded, corpus)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(markdown(results))
    print(markdown(results))


def probe_memory(model: Path, corpus: Path) -> dict:
    """The mask probe's recorded-activation peak per rank: all layers at once (before) and in chunks (after).

    Measured on one 64-token block (a mask probe runs ~L^2/2 layer forwards: more tokens would take CPU
    hours); the figures scale linearly with blocks x tokens, which `at 4 x 4096 tokens` extrapolates."""
    import tempfile

    from adept_ds.probe.layers import probe_model

    found = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, chunk in (("before (all layers)", 10**6), ("after (chunks of 4)", 4)):
            started = time.perf_counter()
            result = probe_model(
                model,
                corpus,
                Path(scratch) / "probe.json",
                max_tokens=64,
                block_size=64,
                batch_size=1,
                mask_chunk_layers=chunk,
                show_progress=False,
            )
            found[label] = (result["recorded_activation_peak_bytes"], time.perf_counter() - started, result["scores"])
    (before, before_s, before_scores), (after, after_s, after_scores) = found.values()
    scale = 4 * 4096 / 64
    diff = max(abs(a - b) for a, b in zip(before_scores, after_scores))
    return {
        "recorded peak, 1 x 64 tokens": f"{before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after ({before_s:.0f} s, {after_s:.0f} s)",
        "recorded peak at 4 x 4096 tokens": f"{before * scale / 2**30:.2f} GiB before, {after * scale / 2**30:.2f} GiB after",
        "scores max abs diff (after vs before)": f"{diff:.2e}",
    }


def markdown(results: dict) -> str:
    gib = 2**30
    c, e = results["checkpoint"], results["export"]
    rows = [
        (
            "model",
            f"{results['model']['parameters'] / 1e9:.2f}B parameters, bf16, {results['model']['shards']} shards, {results['model']['bytes'] / gib:.2f} GiB",
        ),
        ("trainable (2 copies)", f"{results['trainable_parameters'] / 1e6:.1f}M parameters"),
        (
            "checkpoint bytes",
            f"{c['bytes'] / gib:.3f} GiB = {c['ratio']:.4f} x the trainable state ({c['trainable_state_bytes'] / gib:.3f} GiB); before: ~{c['before_bytes_estimate'] / gib:.2f} GiB",
        ),
        (
            "export peak RSS growth",
            f"{e['peak_growth_bytes'] / gib:.2f} GiB; bound (largest shard + trained fp32 + one tensor) {e['bound_bytes'] / gib:.2f} GiB",
        ),
    ]
    if "before_peak_growth_bytes" in e:
        rows.append(("export peak RSS growth before streaming", f"{e['before_peak_growth_bytes'] / gib:.2f} GiB"))
    for key, value in results.get("probe", {}).items():
        rows.append((f"mask probe {key}", value))
    return "| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


if __name__ == "__main__":
    main()
