"""Issue 32: the floor of what the document mask costs on CPU, taken apart: the attention kernel, the mask's
construction, and the model around them.

    python benchmarks/document_mask_attention.py [--block-size 1024] [--batch 2] [--repeats 7] [--threads 1]

document_mask_step.py measures whole training steps on 2 ZeRO-3 ranks. This script runs in one process with
`--threads` (1: what each of the 2 ranks has on a 2-core machine), on the demo model and real blocks of the demo's
domain corpus, packed as training packs them, and times, alternating off and on, median of `--repeats`:
- `sdpa`: one attention call forward and backward at the model's shapes: the causal path (`is_causal=True`, what the
  model runs with the mask off), an explicit causal-only mask (what the explicit-mask path costs by itself), and the
  block-diagonal document mask (what the model runs with the mask on). With any explicit mask the CPU kernel computes
  every query-key tile of the block; with `is_causal` it skips the upper triangle.
- `mask`: building the 4-D mask from the position ids (transformers' `create_causal_mask`, once per forward).
- `model`: the whole model's forward and backward on the same blocks, mask off and on.
The kernel difference times the layers is what sdpa's masked path costs a forward and backward at least; what the
model adds over it is the mask's construction and the rest. Writes `<output>/document_mask_attention.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import REPO, machine  # noqa: E402


def alternated(functions: dict, repeats: int) -> dict[str, float]:
    """The median seconds of each function, run round-robin so that drift falls on all alike (after one warm-up each)."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def packed_batch(model_dir: Path, block_size: int, batch: int, cache: Path):
    """The first `batch` blocks of the demo's domain corpus at `block_size`, with position ids restarting at each document."""
    from transformers import AutoTokenizer

    from adept_ds.data.blocks import Packing, load_blocks, store_batch
    from adept_ds.pipeline import DOMAIN_TRAIN

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    store = load_blocks(DOMAIN_TRAIN, tokenizer, block_size, cache, documents="data.document_mask")
    return store_batch(store, list(range(batch)), Packing(document_mask=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "document_mask")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    from adept_ds.model.demo_model import fetch_demo_model

    model_dir = fetch_demo_model()
    batch = packed_batch(model_dir, args.block_size, args.batch, REPO / "runs" / "document_mask_attention" / "blocks")
    documents = int((batch.position_ids == 0).sum())
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    layers, heads, head_dim = config.num_hidden_layers, config.num_attention_heads, config.hidden_size // config.num_attention_heads

    # One attention call at the model's shapes (key/value heads repeated, as transformers' sdpa path does without GQA).
    shape = (args.batch, heads, args.block_size, head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    causal = torch.ones(args.block_size, args.block_size, dtype=torch.bool).tril()
    positions = batch.position_ids
    document = (positions.unsqueeze(-1) - positions.unsqueeze(-2)) == (  # same document: position gap = index gap
        torch.arange(args.block_size).unsqueeze(-1) - torch.arange(args.block_size).unsqueeze(-2)
    )
    blockwise = (document & causal).unsqueeze(1)  # [B, 1, T, T]

    def attention(**kwargs):
        def run():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()

        return run

    kernel = alternated(
        {
            "causal path": attention(is_causal=True),
            "explicit causal mask": attention(attn_mask=causal.expand(args.batch, 1, -1, -1)),
            "document mask": attention(attn_mask=blockwise),
        },
        args.repeats,
    )

    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    model.train()
    embeds = model.get_input_embeddings()(batch.input_ids).detach()
    mask_built = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None, position_ids=positions)
    assert mask_built is not None and torch.equal(mask_built.expand_as(blockwise), blockwise), "the mask timed is not the model's"

    def build_mask():
        create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None, position_ids=positions)

    def step(with_mask: bool):
        inputs = {"input_ids": batch.input_ids, "labels": batch.input_ids, "use_cache": False}
        if with_mask:
            inputs["position_ids"] = positions

        def run():
            model(**inputs).loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    build = alternated({"build": build_mask}, args.repeats)["build"]
    whole = alternated({"mask off": step(False), "mask on": step(True)}, args.repeats)
    floor = layers * (kernel["document mask"] - kernel["causal path"])
    extra = whole["mask on"] - whole["mask off"]
    record = {
        "machine": machine(),
        "block_size": args.block_size,
        "batch": args.batch,
        "threads": args.threads,
        "documents_in_batch": documents,
        "layers": layers,
        "kernel_s": kernel,
        "mask_build_s": build,
        "model_s": whole,
        "kernel_floor_s": floor,
        "model_extra_s": extra,
    }
    lines = [
        f"Demo model ({layers} layers, {heads} heads of {head_dim}), {args.batch} blocks of {args.block_size} tokens holding "
        f"{documents} documents, {args.threads} thread(s), forward + backward, median of {args.repeats}:",
        "",
        "| what | mask off | mask on | on - off |",
        "|---|---|---|---|",
        f"| one attention call (sdpa) | {kernel['causal path'] * 1e3:.1f} ms (causal path) | {kernel['document mask'] * 1e3:.1f} ms "
        f"(document mask; an explicit causal-only mask: {kernel['explicit causal mask'] * 1e3:.1f} ms) | "
        f"{(kernel['document mask'] - kernel['causal path']) * 1e3:+.1f} ms |",
        f"| x {layers} layers | {layers * kernel['causal path']:.2f} s | {layers * kernel['document mask']:.2f} s | {floor:+.2f} s |",
        f"| building the mask (once a forward) | - | {build * 1e3:.1f} ms | {build * 1e3:+.1f} ms |",
        f"| the model | {whole['mask off']:.2f} s | {whole['mask on']:.2f} s | {extra:+.2f} s ({extra / whole['mask off']:+.1%}) |",
        "",
    ]
    table = "\n".join(lines)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "document_mask_attention.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.output / "document_mask_attention.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
