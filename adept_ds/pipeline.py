"""`adept-ds demo`: the whole method end to end on the offline demo model and bundled corpora.

demo model -> probe (mask) on the general corpus -> expand k=4 -> train under `deepspeed` (2 CPU
ranks, ZeRO-3) on the domain corpus -> export -> evaluate before/after -> report (Markdown + PNG).
With `compare=True` the paper's comparison points train too, on the same data and schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from adept_ds.evaluation.sweep import REPLAY

ASSETS = Path(__file__).parent / "assets"
GENERAL = ASSETS / "general_en.jsonl"
GENERAL_HELDOUT = ASSETS / "general_en_heldout.jsonl"
DOMAIN_TRAIN = ASSETS / "math_train.jsonl"
DOMAIN_TEST = ASSETS / "math_test.jsonl"
COMPARISON = ("adept_replay", "pt_full", "pt_full_replay", "llama_pro", "adept_no_stage1", "adept_no_stage2")


def _step(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_method(
    method: str, model: Path, output: Path, probe: Path, steps: int, num_procs: int, replay: float = 0.0, extra: dict | None = None
) -> Path:
    """One training run under the DeepSpeed launcher (real processes), skipped if already exported.

    `replay` > 0 mixes that share of general text into the domain stream (data.domain as a mixture);
    `extra` holds more run-config overrides (say, train.seed or importance.normalize)."""
    if (output / "final" / "config.json").is_file():
        return output
    from adept_ds.runtime.distributed import free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    overrides = {
        "model": model,
        "method": method,
        "deepspeed": "zero3",  # the shipped ZeRO-3 config, by name: no checkout needed
        "output_dir": output,
        "probe": probe,
        "k": 4,
        "data.domain": DOMAIN_TRAIN,
        "data.general": GENERAL,
        "data.block_size": 128,
        "train.max_steps": steps,
        "train.save_interval": steps,
        "train.micro_batch_size": 2,
        "optimizer.lr": 3e-4,
        "scheduler.type": "WarmupCosineLR",
        "scheduler.warmup_steps": max(1, steps // 10),
        "importance.interval": max(1, steps // 5),
        "importance.batches": 1,
        "importance.batch_size": 2,
        "eval.interval": max(1, steps // 5),  # validation curves for the report, on the demo's held-out files
        # 8 blocks per corpus: enough for the curves (the table's numbers come from the full held-out files); 4096
        # scored all 31 held-out blocks, 22 s a validation, more than the 40 steps of training cost in all
        "eval.max_tokens": 1024,
        "data.general_eval": GENERAL_HELDOUT,
        "data.domain_eval": DOMAIN_TEST,
        "train.export": True,
    }
    if method == "pt_full":
        overrides["optimizer.lr"] = 1e-4  # every weight moves: the usual smaller full-tuning LR
    if replay:
        sources = [{"path": str(DOMAIN_TRAIN), "weight": 1 - replay}, {"path": str(GENERAL), "weight": replay, "name": "replay"}]
        overrides["data.domain"] = json.dumps(sources)  # YAML reads JSON: one key=value override
    overrides.update(extra or {})
    command = [
        str(launcher),
        "--no_local_rank",
        "--num_gpus",
        str(num_procs),
        "--master_port",  # not DeepSpeed's fixed 29500: two demos (or a demo beside a job) must not collide
        str(free_port()),
        "--module",
        "adept_ds.train",
        "--auto-resume",  # an interrupted demo continues where it stopped
        *[f"{key}={value}" for key, value in overrides.items()],
    ]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONWARNINGS": "ignore"}
    subprocess.run(command, check=True, env=env)
    return output


def run_demo(
    output: str | Path = "runs/demo",
    compare: bool = False,
    steps: int = 40,
    num_procs: int = 2,
    probe_tokens: int = 4096,
    k: int = 4,
    max_questions: int = 100,
    eval_tokens: int = 8192,
) -> Path:
    from adept_ds.evaluation.evaluate import evaluate_model
    from adept_ds.evaluation.report import write_report
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.model.expand import expand_checkpoint, read_manifest, uniform_layers
    from adept_ds.probe.layers import layers_from_probe, probe_model, read_probe_result

    output = Path(output).absolute()
    started = time.time()
    _step("fetching the demo model")
    original = fetch_demo_model()
    num_layers = open_checkpoint(original).config["num_hidden_layers"]

    probe_file = output / "probe.json"
    if not probe_file.is_file():
        _step(f"stage 1a: probing layer importance (mask) on {probe_tokens} tokens of general text")
        probe_model(original, GENERAL, probe_file, method="mask", max_tokens=probe_tokens, block_size=128, batch_size=4)
    probe = read_probe_result(probe_file)
    layers = layers_from_probe(probe_file, k, fingerprint_checkpoint(open_checkpoint(original)), num_layers)
    _step(f"stage 1b: expanding the {k} least important layers {layers}")
    models = {"adept": output / "models" / "adept_expanded"}
    if not (models["adept"] / "adept_expansion.json").is_file():
        expand_checkpoint(original, models["adept"], layers, overwrite=True, show_progress=False)
    methods = ["adept", *(COMPARISON if compare else ())]
    if compare:
        models["llama_pro"] = output / "models" / "llama_pro_expanded"
        if not (models["llama_pro"] / "adept_expansion.json").is_file():
            expand_checkpoint(original, models["llama_pro"], uniform_layers(num_layers, k), overwrite=True, show_progress=False)
        models.update(pt_full=original, pt_full_replay=original, adept_no_stage1=original)
        models.update(adept_replay=models["adept"], adept_no_stage2=models["adept"])

    runs = {}
    for name in methods:
        method, replay = REPLAY.get(name, (name, 0.0))
        with_replay = f" with {replay:.0%} general replay" if replay else ""
        _step(f"stage 2: training {name} for {steps} steps on {num_procs} ranks (DeepSpeed ZeRO-3){with_replay}")
        runs[name] = train_method(method, models[name], output / "runs" / name, probe_file, steps, num_procs, replay)

    _step("evaluating before and after")
    corpora = {"general": GENERAL_HELDOUT, "domain": DOMAIN_TEST}
    scope = {"block_size": 128, "max_blocks": eval_tokens // 128, "max_questions": max_questions}  # per held-out corpus
    evaluations = {"before": evaluate_model(original, corpora, DOMAIN_TEST, **scope)}
    for method, run_dir in runs.items():
        evaluations[method] = evaluate_model(run_dir / "final", corpora, DOMAIN_TEST, **scope)
    settings = {
        "probe tokens": probe_tokens,
        "eval tokens": eval_tokens,
        "k": k,
        "steps": steps,
        "ranks": num_procs,
        "tokens per step": 2 * num_procs * 128,
        "expanded layers": read_manifest(models["adept"])["expanded_layers"],
        "wall time min": round((time.time() - started) / 60, 1),
    }
    report = write_report(output / "report", probe, layers, runs, evaluations, settings)
    _step(f"done in {settings['wall time min']} min: {report}")
    return report
