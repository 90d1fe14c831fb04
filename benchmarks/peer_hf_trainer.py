"""adept_ds against its peer's path (issue 16): the same job through HF Trainer + DeepSpeed ZeRO-3 with
`requires_grad`-frozen layers, which is what LLaMA-Factory's freeze / llama_pro modes run. Side by side, one run.

    python benchmarks/peer_hf_trainer.py [--steps 8] [--block-size 128]

The job (as issue 16 measured it): SmolLM2-135M, the demo's domain corpus, micro-batch 2 x 128 tokens, 2 ranks,
ZeRO-3, fp32, constant LR, 8 optimizer steps; the figure is the median step time of steps 3-8 (the slower rank).
- llama_pro: k=5 uniform copies (a copy after every 6th layer), only the copies train.
- adept: the copies after the suite's probe layers (12, 14, 16, 17). HF Trainer has no unit-wise LR: the peer
  trains the same copies with one LR; adept_ds's timed steps exclude its importance passes (benchmarks/suite.py
  reports their cost: one per 500 steps).
Runs per job: adept_ds as shipped (train.frozen_weights auto), adept_ds with the sharded backbone and the
~3-layer window (before issue 16), HF Trainer given adept_ds's resolved ZeRO-3 JSON (gradient checkpointing off),
and HF Trainer with LLaMA-Factory's shipped ZeRO-3 example (whole model live; gradient checkpointing on, as
LLaMA-Factory enables it by default). Target: adept_ds <= 0.8x the faster HF Trainer run, for both jobs.
Writes benchmarks/results/peer_hf_trainer-<device>.{json,md}.

With --rank-script this file is one rank of the HF Trainer run (started by the DeepSpeed launcher).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

TARGET = 0.8
LLAMA_FACTORY_Z3 = {
    # LLaMA-Factory 0.9.5 examples/deepspeed/ds_z3_config.json ("auto" values are filled by HF's integration)
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def rank_main(argv: list[str]) -> None:
    """One HF Trainer rank: argv = result_dir model_dir ds_config.json steps block_size micro lr checkpointing."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from adept_ds.data.blocks import load_blocks
    from adept_ds.model.expand import read_manifest
    from adept_ds.pipeline import DOMAIN_TRAIN

    result_dir, model_dir, ds_path, steps, block, micro, lr, checkpointing = argv
    steps, block, micro, lr, checkpointing = int(steps), int(block), int(micro), float(lr), checkpointing == "1"
    ds_config = json.loads(Path(ds_path).read_text())
    # On CPU, HF's TrainingArguments leaves the process group to DeepSpeed, which zero.Init needs before loading.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    # TrainingArguments first: its DeepSpeed config makes from_pretrained load straight into ZeRO-3 partitions.
    training = TrainingArguments(
        output_dir=str(Path(result_dir) / "trainer"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        deepspeed=ds_config,
        gradient_checkpointing=checkpointing,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and ds_config.get("bf16", {}).get("enabled") is True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    copies = set(read_manifest(model_dir)["copied_layers"])
    for name, param in model.named_parameters():  # LLaMA-Factory's freeze: requires_grad on the trained layers only
        param.requires_grad_(any(name.startswith(f"model.layers.{layer}.") for layer in copies))
    if checkpointing:
        model.enable_input_require_grads()  # what LLaMA-Factory does for frozen embeddings under checkpointing
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    store = load_blocks(DOMAIN_TRAIN, tokenizer, block, Path(result_dir).parent / "blocks")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(store)

        def __getitem__(self, index):
            ids = store[[index]][0]
            return {"input_ids": ids, "labels": ids}

    starts, seconds = {}, []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts[state.global_step] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - starts[state.global_step - 1])

    trainer = Trainer(model=model, args=training, train_dataset=Blocks(), callbacks=[StepTimes()])
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "step_seconds": seconds, "threads": torch.get_num_threads()}))


def hf_trainer_run(name: str, model: Path, ds_config: dict, work: Path, args, checkpointing: bool) -> dict:
    from suite import launch_ranks, launcher_command

    from adept_ds.runtime.distributed import free_port

    result_dir = work / "runs" / name
    result_dir.mkdir(parents=True, exist_ok=True)
    ds_path = result_dir / "ds_config.json"
    ds_path.write_text(json.dumps(ds_config, indent=2))
    command = [*launcher_command(2, free_port()), str(Path(__file__).resolve()), "--rank-script"]
    command += [
        str(result_dir),
        str(model),
        str(ds_path),
        str(args.steps),
        str(args.block_size),
        "2",
        "1e-4",
        "1" if checkpointing else "0",
    ]
    print(f"[peer] {name}: HF Trainer + DeepSpeed ZeRO-3, {args.steps} steps", flush=True)
    ranks = launch_ranks(name, command, result_dir, 2)
    return {"step_seconds": max(statistics.median(r["step_seconds"][2:]) for r in ranks), "threads": ranks[0]["threads"]}


def adept_ds_run(name: str, method: str, model: Path, work: Path, args, extra: dict, ds_config: Path) -> tuple[dict, dict]:
    """(the run's step time, the DeepSpeed config it resolved)."""
    from types import SimpleNamespace

    from suite import run_ranks

    from adept_ds.runtime.distributed import free_port

    settings = SimpleNamespace(
        num_procs=2, block_size=args.block_size, micro_batch_size=2, warmup_steps=2, timed_steps=args.steps - 2, port=free_port()
    )
    extra = {"data.cache_dir": work / "blocks", "optimizer.lr": 1e-4, **extra}
    ranks = run_ranks(name, method, model, work, settings, ds_config, extra, importance_repeats=0)
    resolved = json.loads((work / "runs" / name / "run" / "ds_config.json").read_text())
    step = max(statistics.median(r["step_seconds"]) for r in ranks)
    return {"step_seconds": step, "layout": ranks[0]["layout"], "threads": ranks[0]["threads"]}, resolved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(BENCHMARKS / "results"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--jobs", default="llama_pro,adept")
    args = parser.parse_args()

    from suite import REPO, expanded_model, machine, write_result

    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.model.expand import uniform_layers
    from adept_ds.model.families import decoder_layer_numel
    from adept_ds.run.ds_config import DEEPSPEED_WINDOW, WINDOW_LAYERS

    started = time.time()
    output = Path(args.output)
    work = output / "work" / "peer"
    work.mkdir(parents=True, exist_ok=True)
    original = fetch_demo_model()
    num_layers = json.loads((original / "config.json").read_text())["num_hidden_layers"]
    jobs = {"llama_pro": uniform_layers(num_layers, 5), "adept": [12, 14, 16, 17]}
    layered = None
    results = {}
    for job in [job for job in args.jobs.split(",") if job]:
        model = expanded_model(original, work / "models" / job, jobs[job])
        if layered is None:
            layer = decoder_layer_numel(json.loads((model / "config.json").read_text()))
            layered = work / "zero3_layered.json"
            config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
            config["zero_optimization"].update({key: min(WINDOW_LAYERS[key] * layer, d) for key, d in DEEPSPEED_WINDOW.items()})
            layered.write_text(json.dumps(config, indent=2))
        runs = {}
        runs["adept_ds"], _ = adept_ds_run(f"{job}_adept_ds", job, model, work, args, {}, REPO / "ds_configs" / "zero3.json")
        runs["adept_ds, sharded + ~3-layer window (before)"], before_config = adept_ds_run(
            f"{job}_adept_ds_before", job, model, work, args, {"train.frozen_weights": "sharded"}, layered
        )
        runs["HF Trainer, adept_ds's ZeRO-3 JSON (before), ckpt off"] = hf_trainer_run(
            f"{job}_hf_ds_json", model, before_config, work, args, checkpointing=False
        )
        runs["HF Trainer, LLaMA-Factory's ZeRO-3 example, ckpt on"] = hf_trainer_run(
            f"{job}_hf_llama_factory", model, LLAMA_FACTORY_Z3, work, args, checkpointing=True
        )
        peer = min(run["step_seconds"] for name, run in runs.items() if name.startswith("HF Trainer"))
        ratio = runs["adept_ds"]["step_seconds"] / peer
        results[job] = {"layers": jobs[job], "runs": runs, "ratio_to_faster_peer": ratio, "met": ratio <= TARGET}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": vars(args),
        "jobs": results,
        "seconds": time.time() - started,
    }
    lines = [
        f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); SmolLM2-135M, 2 ranks, ZeRO-3, fp32, micro-batch "
        f"2 x {args.block_size} tokens, {args.steps} steps, median of steps 3-{args.steps} (slower rank); {result['date']}; "
        f"{result['seconds']:.0f} s in all.",
        "",
        "| job | run | step s | vs faster HF Trainer | threads / rank |",
        "|---|---|---|---|---|",
    ]
    for job, record in results.items():
        peer = min(run["step_seconds"] for name, run in record["runs"].items() if name.startswith("HF Trainer"))
        for name, run in record["runs"].items():
            lines.append(
                f"| {job} (copies after {record['layers']}) | {name} | {run['step_seconds']:.2f} | {run['step_seconds'] / peer:.3f} | {run['threads']} |"
            )
    lines += ["", "| job | adept_ds / faster HF Trainer | target |", "|---|---|---|"]
    for job, record in results.items():
        lines.append(f"| {job} | {record['ratio_to_faster_peer']:.3f} | <= {TARGET} ({'met' if record['met'] else 'NOT met'}) |")
    write_result(output, "peer_hf_trainer", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-script"]:
        rank_main(sys.argv[2:])
    else:
        main()
