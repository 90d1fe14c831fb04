"""The GPU check: every stage on one GPU in bf16, in one run of a few minutes (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py [--output benchmarks/results] [--peak-tflops 989] [--smoke]

On a random-weight Llama (~1.1B parameters, bf16, built from a config: no hub access):
1. the probe, mask and grad, on the GPU in the model's dtype (timed; the mask probe's recorded peak);
2. adept (k=2 copies at the mask probe's least important layers) and pt_full training in bf16 under
   ZeRO-3 on one rank: median step time, tokens/s, peak GPU memory, model FLOPs utilisation, bytes all-gathered;
   adept also with train.frozen_weights=sharded (the default picks replicated when it fits); each also with
   activation checkpointing, and adept with HF's loss instead of the bf16 chunked one; every run's peak
   beside `adept-ds plan`'s prediction for it;
3. the LM loss alone at Llama-3's vocabulary: the chunked loss with the GPU's chunk rule, with the CPU's, and HF's
   (time, peak memory); the planner's GPU allowance measured (CUDA context, NCCL buffers, fragmentation);
4. export of the adept run (streamed, bf16 kept) and evaluation of the export on the GPU;
5. the document mask (issue 32): adept trained with data.document_mask on (step time, with the kernel auto picks:
   flash-attention 2's varlen path where flash-attn is installed), and packed blocks scored in one call against
   their documents scored alone, on that kernel in bf16 (the largest relative difference of the per-block losses).
Writes `<output>/gpu-<date>.md` and `.json`. `--smoke` runs the same code on a tiny model, on CPU
when there is no GPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCHMARKS))

SIZES = {
    "check": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 16, "num_key_value_heads": 4},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
}


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def ds_config() -> Path:
    return REPO / "ds_configs" / ("zero3_bf16.json" if torch.cuda.is_available() else "zero3.json")


def save_checkpoint_run(model: Path, work: Path, args) -> Path:
    """A short adept run that ends in a checkpoint, for export (suite.py's timed runs do not save)."""
    from adept_ds.pipeline import DOMAIN_TRAIN, GENERAL

    output = work / "runs" / "adept_export"
    overrides = {
        "model": model,
        "method": "adept",
        "deepspeed": ds_config(),
        "output_dir": output,
        "data.domain": DOMAIN_TRAIN,
        "data.general": GENERAL,
        "data.block_size": args.block_size,
        "train.micro_batch_size": args.micro_batch_size,
        "train.max_steps": 3,
        "train.export": False,
        "scheduler.warmup_steps": 1,
        "importance.interval": 2,
    }
    from suite import launcher_command

    command = [*launcher_command(1, args.port + 1), "--module", "adept_ds.train"]
    command += ["--auto-resume", *[f"{key}={value}" for key, value in overrides.items()]]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return output


def planned_peak(run: dict) -> int:
    """`adept-ds plan`'s peak for a run config of suite.run_ranks (`run_overrides`): its steps or its importance pass."""
    from adept_ds.run.config import load_run_config
    from adept_ds.run.memory_layout import device_bytes, layout_and_plan
    from adept_ds.run.plan import TRAINING_PHASES, model_shape

    config = load_run_config(None, [f"{key}={value}" for key, value in run.items()])
    gpu = torch.cuda.is_available()
    _, plan = layout_and_plan(config, model_shape(config), 1, gpu, device_bytes(config, gpu))  # the layout the run takes
    return max(plan.phases[phase].total for phase in TRAINING_PHASES if phase in plan.phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=BENCHMARKS / "results")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the GPU (default: from its name)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script, measures nothing")
    parser.add_argument("--port", type=int, default=29741)
    args = parser.parse_args()
    args.block_size, args.micro_batch_size, args.timed_steps = (64, 2, 2) if args.smoke else (2048, 4, 5)
    args.num_procs, args.warmup_steps = 1, 2  # what suite.run_ranks reads

    from scale import build_model
    from suite import run_overrides, run_ranks

    from adept_ds.evaluation.evaluate import evaluate_model
    from adept_ds.model.expand import expand_checkpoint, read_manifest
    from adept_ds.pipeline import DOMAIN_TEST, GENERAL, GENERAL_HELDOUT
    from adept_ds.probe.layers import probe_model
    from adept_ds.run.flops import gpu_peak_tflops
    from adept_ds.training.export import export_checkpoint

    started = time.time()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if gpu is None and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); --smoke runs on CPU")
    peak = args.peak_tflops or (gpu_peak_tflops(gpu, half_precision=True) if gpu else None)  # adept_ds/run/flops.py's table
    work = args.output / "work" / "gpu_check"
    work.mkdir(parents=True, exist_ok=True)
    size = "smoke" if args.smoke else "check"
    original = build_model(work / f"llama_{size}", max_shard_size="1GB", **SIZES[size])
    report: dict = {"gpu": gpu, "torch": torch.__version__, "peak_tflops": peak, "model": SIZES[size], "probe": {}, "train": {}}
    print(f"[gpu_check] {gpu or 'CPU (smoke)'}: model {size}", flush=True)

    tokens = 4 * args.block_size * (1 if args.smoke else 4)
    for method in ("mask", "grad"):
        result, seconds = timed(
            probe_model,
            original,
            GENERAL,
            work / f"probe_{method}.json",
            method=method,
            max_tokens=tokens,
            block_size=args.block_size,
            show_progress=False,
        )
        report["probe"][method] = {"seconds": seconds, "tokens": result["num_tokens"], "dtype": result.get("dtype")}
        if method == "mask":
            report["probe"][method]["recorded_peak_bytes"] = result.get("recorded_activation_peak_bytes")
            layers = sorted(result["least_important"][:2])
        print(f"[gpu_check] probe {method}: {seconds:.1f} s", flush=True)

    expanded = work / "expanded"
    if not (expanded / "adept_expansion.json").is_file() or read_manifest(expanded)["expanded_layers"] != layers:
        expand_checkpoint(original, expanded, layers, overwrite=True, show_progress=False)
    runs = {
        "adept": ("adept", expanded, {}),
        "adept, frozen weights sharded": ("adept", expanded, {"train.frozen_weights": "sharded"}),
        "adept, checkpointing": ("adept", expanded, {"train.activation_checkpointing": True}),
        "adept, HF loss": ("adept", expanded, {"train.chunked_loss": False}),
        "adept, document mask": ("adept", expanded, {"data.document_mask": True}),
        "pt_full": ("pt_full", original, {}),
        "pt_full, checkpointing": ("pt_full", original, {"train.activation_checkpointing": True}),
    }
    for name, (method, model, extra) in runs.items():
        run_name = name.replace(", ", "_").replace(" ", "_")
        extra = {**extra, **({"train.peak_tflops": peak} if peak else {})}
        rank = run_ranks(run_name, method, model, work, args, ds_config(), extra=extra)[0]
        step = statistics.median(rank["step_seconds"])
        tokens_per_s = rank["tokens_per_step_per_rank"] / step
        report["train"][name] = {
            "planned_peak_gb": planned_peak(run_overrides(run_name, method, model, work, args, ds_config(), extra)) / 2**30,
            "step_seconds": step,
            "tokens_per_second": tokens_per_s,
            "peak_gpu_gb": (rank["peak_gpu_mb"] or 0) / 1024,
            "importance_seconds": statistics.median(rank["importance_seconds"]) if rank["importance_seconds"] else None,
            # by the exact count of what the step runs, and at 6N as peers quote it (adept_ds/run/flops.py)
            "mfu": rank["step_flops"] / step / (rank["peak_tflops"] * 1e12) if rank["peak_tflops"] else None,
            "mfu_6n": rank["step_flops_6n"] / step / (rank["peak_tflops"] * 1e12) if rank["peak_tflops"] else None,
            "trainable_parameters": rank["trainable_parameters"],
            "gathered_gb_per_step": rank["gathered_bytes_per_step"] / 2**30,
            "layout": rank["layout"],
            "peak_gpu_reserved_gb": (rank["peak_gpu_reserved_mb"] or 0) / 1024,
            "gpu_outside_torch_gb": (rank["gpu_outside_torch_mb"] or 0) / 1024,
        }
        print(f"[gpu_check] train {name}: {step:.3f} s/step", flush=True)

    report["loss"] = loss_check(args.smoke)
    report["document_mask"] = document_mask_check(original, work, args.block_size)
    report["allowance"] = allowance_check(report["train"])

    run = save_checkpoint_run(expanded, work, args)
    exported, export_seconds = timed(export_checkpoint, run / "checkpoints", None, expanded, work / "export", show_progress=False)
    evaluated, eval_seconds = timed(
        evaluate_model, exported, {"general": GENERAL_HELDOUT, "domain": DOMAIN_TEST}, DOMAIN_TEST, max_questions=16
    )
    report["export_seconds"], report["eval_seconds"] = export_seconds, eval_seconds
    report["eval"] = {"dtype": evaluated["dtype"], **{k: v["perplexity"] for k, v in evaluated["perplexity"].items()}}
    report["seconds"] = time.time() - started
    name = f"gpu-{time.strftime('%Y-%m-%d')}{'-smoke' if args.smoke else ''}"
    (args.output / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


def loss_check(smoke: bool) -> dict:
    """The chunked loss with the GPU's chunks (lm_loss.chunk_rows, gpu=True), with the CPU's (2^24 logits), and
    HF's (whole logits in fp32), forward and backward at Llama-3's vocabulary: median seconds and peak memory."""
    import torch.nn.functional as F

    from adept_ds.model.lm_loss import CHUNK_LOGITS, chunk_rows, chunked_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, hidden, vocab = (512, 64, 1024) if smoke else (8192, 4096, 128256)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=generator).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=generator) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=generator)

    gpu_rows, cpu_rows = chunk_rows(vocab, gpu=True), chunk_rows(vocab)
    variants = {
        f"chunked, GPU rule ({gpu_rows} rows)": lambda: chunked_cross_entropy(x, w, targets, gpu_rows),
        f"chunked, CPU rule ({cpu_rows} rows, {CHUNK_LOGITS} logits)": lambda: chunked_cross_entropy(x, w, targets, cpu_rows),
        "HF (all logits, fp32 loss)": lambda: F.cross_entropy((x @ w.T).float(), targets),
    }
    found = {}
    for name, loss_fn in variants.items():
        seconds, losses = [], []
        for _ in range(2 if smoke else 6):
            x.grad = w.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            started = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            losses.append(loss.item())
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
        found[name] = {"seconds": statistics.median(seconds[1:]), "peak_gb": peak, "loss": losses[-1]}
        print(f"[gpu_check] loss {name}: {found[name]['seconds'] * 1e3:.1f} ms", flush=True)
    return {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype), "variants": found}


def document_mask_check(model_dir: Path, work: Path, block_size: int, blocks: int = 4) -> dict:
    """Packed blocks of the demo's domain corpus (short problems, many to a block) with the document mask (each
    document's first label dropped, so that a document scored alone has the same labels), scored in one call on the
    kernel `auto` picks, against each document scored alone on the same kernel; the largest relative difference of the
    blocks' token-weighted losses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adept_ds.data.blocks import Packing, load_blocks, store_batch
    from adept_ds.model.attention import FLASH_ATTENTION, resolve_attention
    from adept_ds.pipeline import DOMAIN_TEST

    gpu = torch.cuda.is_available()
    kernel, why = resolve_attention("auto", gpu=gpu, half=gpu)
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=kernel).to(device).eval()
    store = load_blocks(DOMAIN_TEST, AutoTokenizer.from_pretrained(model_dir), block_size, work / "blocks", documents="data.document_mask")
    packing = Packing(document_mask=True, loss_on_document_start=False, one_row=kernel == FLASH_ATTENTION)
    differences, documents = [], 0
    with torch.no_grad():
        for index in range(min(blocks, len(store))):
            batch = store_batch(store, [index], packing).to(device)
            packed = model(**batch.model_inputs(), use_cache=False).loss.double().item()
            ids, positions = batch.input_ids[0], batch.position_ids[0]
            starts = [*torch.nonzero(positions == 0).flatten().tolist(), len(ids)]
            total, count = 0.0, 0
            for start, end in zip(starts, starts[1:]):
                if end - start > 1:
                    piece = ids[start:end][None]
                    total += model(input_ids=piece, labels=piece, use_cache=False).loss.double().item() * (end - start - 1)
                    count += end - start - 1
            documents += len(starts) - 1
            differences.append(abs(packed - total / count) / abs(total / count))
    found = {"kernel": kernel, "why": why, "dtype": str(dtype), "blocks": len(differences), "documents": documents}
    found["max_relative_difference"] = max(differences)
    print(f"[gpu_check] document mask on {kernel}: packed against alone, max relative difference {max(differences):.2e}", flush=True)
    return found


def allowance_check(train: dict) -> dict:
    """plan.GpuAllowance's parts measured: the CUDA context with cuBLAS loaded, a world-of-one NCCL communicator
    after an all-reduce (each in a fresh process: device memory in use beyond torch's reserve), and fragmentation
    (reserved minus allocated at the peak) of every training run above."""
    from adept_ds.run.plan import GPU_ALLOWANCE

    probe = (
        f"import json, os, sys, torch; sys.path.insert(0, {str(BENCHMARKS)!r}); from train_step import outside_torch_mb\n"
        "x = torch.ones(4096, 4096, device='cuda', dtype=torch.bfloat16); (x @ x).sum().item()\n"
        "if os.environ.get('WITH_NCCL'):\n"
        "    import torch.distributed as dist\n"
        "    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29751', RANK='0', WORLD_SIZE='1')\n"
        "    dist.init_process_group('nccl', device_id=torch.device('cuda', 0)); dist.all_reduce(x); torch.cuda.synchronize()\n"
        "print('RESULT', json.dumps(outside_torch_mb() / 1024))\n"
    )
    measured = {}
    if torch.cuda.is_available():
        for name, extra in (("cuda_context", {}), ("with_nccl", {"WITH_NCCL": "1"})):
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **extra})
            measured[name] = json.loads(out.stdout.split("RESULT")[-1]) if "RESULT" in out.stdout else out.stderr[-500:]
        if all(isinstance(value, float) for value in measured.values()):
            measured["nccl_buffers"] = measured.pop("with_nccl") - measured["cuda_context"]
    fragmentation = {name: run["peak_gpu_reserved_gb"] - run["peak_gpu_gb"] for name, run in train.items() if run["peak_gpu_reserved_gb"]}
    measured["fragmentation"] = max(fragmentation.values()) if fragmentation else None
    measured["fragmentation_by_run"] = fragmentation
    measured["in_training_runs_outside_torch"] = {name: run["gpu_outside_torch_gb"] for name, run in train.items()}
    planned = {
        "cuda_context": GPU_ALLOWANCE.cuda_context,
        "nccl_buffers": GPU_ALLOWANCE.nccl_buffers,
        "fragmentation": GPU_ALLOWANCE.fragmentation,
    }
    return {"measured_gb": measured, "planned_gb": {name: value / 2**30 for name, value in planned.items()}}


def markdown(report: dict) -> str:
    lines = [
        f"GPU check: {report['gpu'] or 'CPU smoke run'}, torch {report['torch']}, model {report['model']}, {report['seconds']:.0f} s in all.",
        "",
        "| stage | figure |",
        "|---|---|",
    ]
    for method, probe in report["probe"].items():
        extra = f", recorded peak {probe['recorded_peak_bytes'] / 2**20:.0f} MiB" if probe.get("recorded_peak_bytes") else ""
        lines.append(f"| probe {method} | {probe['seconds']:.1f} s for {probe['tokens']} tokens ({probe['dtype']}){extra} |")
    for method, run in report["train"].items():
        mfu = f", MFU {run['mfu']:.1%} ({run['mfu_6n']:.1%} at 6N)" if run["mfu"] is not None else ""
        lines.append(
            f"| train {method} (bf16, ZeRO-3, 1 rank) | {run['step_seconds']:.3f} s/step, {run['tokens_per_second']:.0f} tok/s, "
            f"peak {run['peak_gpu_gb']:.2f} GiB (planned {run['planned_peak_gb']:.2f}){mfu}, all-gathered "
            f"{run['gathered_gb_per_step']:.2f} GiB/step ({run['layout'].split(':')[0]}) |"
        )
    loss = report["loss"]
    for name, variant in loss["variants"].items():
        peak = f", peak {variant['peak_gb']:.2f} GiB" if variant["peak_gb"] is not None else ""
        lines.append(
            f"| loss {name}, {loss['tokens']} tokens x {loss['vocab']} vocab, forward + backward | "
            f"{variant['seconds'] * 1e3:.1f} ms{peak}, loss {variant['loss']:.4f} |"
        )
    mask = report["document_mask"]
    lines.append(
        f"| document mask: {mask['blocks']} packed blocks ({mask['documents']} documents) against each document alone, "
        f"{mask['kernel']} in {mask['dtype']} | largest relative difference {mask['max_relative_difference']:.2e} |"
    )
    allowance = report["allowance"]
    for part, planned in allowance["planned_gb"].items():
        value = allowance["measured_gb"].get(part)
        shown = f"{value:.2f} GiB" if isinstance(value, float) else "not measured (no GPU)"
        lines.append(f"| GPU allowance: {part} (planned {planned:.1f} GiB) | {shown} |")
    lines.append(f"| export (streamed) | {report['export_seconds']:.1f} s |")
    ppl = ", ".join(f"{name} ppl {value:.1f}" for name, value in report["eval"].items() if name != "dtype")
    lines.append(f"| eval of the export ({report['eval']['dtype']}) | {report['eval_seconds']:.1f} s; {ppl} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
