"""Cost of `mask` probing with activation reuse versus the naive way (one full forward per bypassed layer).

Both paths compute the same numbers (checked here too); only the reuse of the layers below the
bypassed one differs. Two 30-layer models, side by side:
- `demo`: SmolLM2-135M (hidden 576, vocab 49152). Its LM head costs about 10 decoder layers, and
  every masked pass needs its own head, so the FLOP floor of the ratio is about 0.64 there.
- `llama-30L`: random weights, Llama proportions (hidden 1024, MLP 2816, vocab 32000), head = ~3 layers.
The `predicted` column is the ratio expected from measured per-layer and per-head times:
(base + sum over l of (L-1-l layers + head)) / ((L+1) full forwards).

    python benchmarks/probe_cost.py [--models demo,llama-30L] [--batch-size 2] [--block-size 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_time(function, repeats: int) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def random_llama_30l():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def measure(name: str, model, batch_size: int, block_size: int, repeats: int, device) -> dict:
    from adept_ds.model.families import family_of
    from adept_ds.probe.mask import mask_loss_sums, naive_mask_loss_sums, record_layer_inputs
    from adept_ds.probe.runtime import next_token_loss_sum

    model = model.to(device).eval()
    family = family_of(model)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (batch_size, block_size), generator=generator).to(device)

    def timed(function, *args):
        def run():
            with torch.no_grad():
                result = function(*args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return result

        return run

    timed(mask_loss_sums, family, model, batch)()  # warm-up
    naive_s, naive = best_time(timed(naive_mask_loss_sums, family, model, batch), repeats)
    reuse_s, (reuse, _) = best_time(timed(mask_loss_sums, family, model, batch), repeats)
    # The FLOP-model floor from measured unit costs: one decoder layer, one head (final norm + head + loss).
    layers = family.decoder_layers(model)
    inputs, kwargs, final = record_layer_inputs(family, model, batch)
    layer_s, _ = best_time(timed(lambda: layers[len(layers) // 2](inputs[len(layers) // 2], **kwargs[len(layers) // 2])), repeats)
    head_s, _ = best_time(timed(next_token_loss_sum, family, model, final, batch), repeats)
    n, head = len(layers), head_s / layer_s
    floor = ((n + head) + n * (n - 1) / 2 + n * head) / ((n + 1) * (n - 1 + head) + 1)
    return {
        "model": name,
        "layers": n,
        "tokens": batch_size * block_size,
        "head_in_layers": round(head, 2),
        "naive_s": round(naive_s, 3),
        "reuse_s": round(reuse_s, 3),
        "ratio": round(reuse_s / naive_s, 3),
        "floor": round(floor, 3),
        "max_mean_loss_diff": (naive - reuse).abs().max().item() / (batch_size * (block_size - 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,llama-30L", help="comma-separated: demo, llama-30L, or a checkpoint dir")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.runtime.distributed import on_cpu

    device = torch.device("cpu" if on_cpu() else "cuda")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for name in args.models.split(","):
        if name == "llama-30L":
            model = random_llama_30l()
        else:
            model = AutoModelForCausalLM.from_pretrained(fetch_demo_model() if name == "demo" else name, dtype=torch.float32)
        rows.append(measure(name, model, args.batch_size, args.block_size, args.repeats, device))
        del model
    print(f"mask probing cost on {device_name}, {args.batch_size} x {args.block_size} tokens per pass")
    print("| model | layers | head (in layers) | naive s | reuse s | reuse / naive | predicted from unit costs | max |mean-loss diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['layers']} | {row['head_in_layers']} | {row['naive_s']} | {row['reuse_s']} "
            f"| {row['ratio']} | {row['floor']} | {row['max_mean_loss_diff']:.1e} |"
        )
    print(json.dumps({"device": device_name, "rows": rows}))


if __name__ == "__main__":
    main()
