"""Training memory (issue 14): activation checkpointing in the engine, and the LM loss without its logits.

    python benchmarks/training_memory.py [--output benchmarks/results] [--block-size 256] [--timed-steps 3] [--skip-engine]

1. Activation checkpointing, in the real engine: the demo model (SmolLM2-135M), 2 ranks, the shipped
   zero3.json, `adept` (k=4 copies at the probe's placement, benchmarks/RESULTS.md) and `pt_full`, each
   with `train.activation_checkpointing` off and on: peak memory per rank (RSS on CPU, max allocated on
   GPU) and step time (benchmarks/train_step.py under the launcher, as benchmarks/suite.py runs it).
2. The LM loss alone, one process per case: HF's (the whole logits, upcast to fp32) against adept_ds's
   chunked one, with the head frozen (ADEPT) or trained (pt_full), at SmolLM2's and Llama-3's vocabulary
   in fp32 and at SmolLM2's in bf16: the memory forward + backward adds to what the inputs hold, and seconds.
Writes `<output>/training_memory-<device>.json` and `.md`, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).parent
ADEPT_LAYERS = [12, 14, 16, 17]  # the demo probe's k=4 least important layers (benchmarks/RESULTS.md, issue 7)
# (tokens, hidden, vocab) and the dtypes measured: SmolLM2-135M at 4 x 512 tokens and a Llama-3 vocabulary in
# fp32; bf16 with a narrow hidden size, because this CPU has no bf16 matmul (its emulated GEMMs are 5-70x slower).
LOSS_SHAPES = {
    "smollm2": ((2048, 576, 49152), ("float32",)),
    "llama3_vocab": ((1024, 256, 128256), ("float32",)),
    "smollm2_narrow": ((2048, 64, 49152), ("bfloat16",)),
}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def loss_case(impl: str, dtype: str, head: str, shape: str) -> dict:
    """Forward + backward of one loss in this process: peak memory above what the inputs hold, and seconds."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from adept_ds.model.lm_loss import chunk_rows, chunked_cross_entropy

    tokens, hidden_size, vocab = LOSS_SHAPES[shape][0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, getattr(torch, dtype)).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(device, getattr(torch, dtype))
    weight.requires_grad_(head == "trained")
    labels = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)
    targets = torch.cat([labels[0, 1:], torch.tensor([-100], device=device)])
    before = current_memory_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if impl == "hf":  # what a HF causal LM's forward does: the logits, then its loss over them
        loss = ForCausalLMLoss(hidden[None] @ weight.T, labels, vocab)
    elif impl == "torch":  # torch's chunked op as adept_ds used it before, for fp32 runs only
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_rows(vocab), chunking_method=None, acc_policy="compact")
        loss = torch.nn.functional.linear_cross_entropy(hidden, weight, targets, ignore_index=-100, options=options)
    else:
        loss = chunked_cross_entropy(hidden, weight, targets)
    loss.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"added_mb": peak_memory_mb() - before, "seconds": seconds, "loss": loss.item(), "loss_dtype": str(loss.dtype)}


def run_loss_cases() -> list[dict]:
    cases = []
    for shape, (_, dtypes) in LOSS_SHAPES.items():
        for dtype in dtypes:
            for head in ("frozen", "trained"):
                for impl in ("hf", "chunked") + (("torch",) if dtype == "float32" else ()):
                    args = [impl, dtype, head, shape]
                    print(f"[training_memory] loss {' '.join(args)}", flush=True)
                    done = subprocess.run([sys.executable, __file__, "--loss-case", *args], capture_output=True, text=True, check=True)
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    cases.append(dict(zip(("impl", "dtype", "head", "shape"), args), **result))
    return cases


def run_engine(args) -> dict:
    from suite import expanded_model, run_ranks, summarise

    from adept_ds.model.demo_model import fetch_demo_model

    work = Path(args.output) / "work"
    original = fetch_demo_model()
    models = {"adept": expanded_model(original, work / "models" / "middle", ADEPT_LAYERS), "pt_full": original}
    runs = {}
    for method, model in models.items():
        for checkpointing in (False, True):
            name = f"{method}_checkpointing_{'on' if checkpointing else 'off'}"
            extra = {"train.activation_checkpointing": checkpointing}
            runs[name] = summarise(run_ranks(name, method, model, work, args, extra=extra))
    return runs


def markdown(result: dict) -> str:
    lines = []
    if result["engine"]:
        lines += [
            f"{result['settings']['num_procs']} ranks, ZeRO-3 (zero3.json), {result['settings']['micro_batch_size']} x "
            f"{result['settings']['block_size']} tokens per rank per step; adept copies after layers {ADEPT_LAYERS}.",
            "",
            "| run | step s | peak MB per rank | memory kind |",
            "|---|---|---|---|",
        ]
        for name, run in result["engine"].items():
            lines.append(f"| {name} | {run['step_seconds']:.2f} | {run['peak_memory_mb']:.0f} | {run['memory_kind']} |")
        lines.append("")
    lines += ["| shape (tokens, hidden, vocab) | dtype | head | HF MB | chunked MB | torch's op MB | HF s | chunked s | torch's op s |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    cases = {(c["shape"], c["dtype"], c["head"], c["impl"]): c for c in result["loss"]}
    for shape, dtype, head, impl in cases:
        if impl != "hf":
            continue
        hf, chunked, op = cases[shape, dtype, head, "hf"], cases[shape, dtype, head, "chunked"], cases.get((shape, dtype, head, "torch"))
        op_mb, op_s = (f"{op['added_mb']:.0f}", f"{op['seconds']:.2f}") if op else ("-", "-")
        lines.append(
            f"| {shape} {LOSS_SHAPES[shape][0]} | {dtype} | {head} | {hf['added_mb']:.0f} | {chunked['added_mb']:.0f} | {op_mb} | "
            f"{hf['seconds']:.2f} | {chunked['seconds']:.2f} | {op_s} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is not a package
    from suite import add_run_arguments, write_result

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(BENCHMARKS / "results"))
    add_run_arguments(parser, warmup_steps=1, timed_steps=3, port=29741)
    parser.add_argument("--skip-engine", action="store_true", help="only the LM loss cases")
    parser.add_argument("--loss-case", nargs=4, metavar=("IMPL", "DTYPE", "HEAD", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_case:
        print(json.dumps(loss_case(*args.loss_case)))
        return

    started = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args)}
    result["engine"] = None if args.skip_engine else run_engine(args)
    result["loss"] = run_loss_cases()
    result["seconds"] = time.time() - started
    write_result(output, "training_memory", result, markdown(result))


if __name__ == "__main__":
    main()
