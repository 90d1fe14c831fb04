"""Stage 1a: general-competence layer probing, and the probe result file format.

Methods (higher score = the layer matters more for general competence; ADEPT expands the k lowest):
- `mask`: I(l) = L_masked(l) - L_base, the mean next-token loss with layer l bypassed (its output :=
  its input) minus the plain loss. The base pass records layer inputs; the pass that bypasses layer l
  restarts from layer l's recorded input and runs only the layers above it (see `mask.py`). The
  candidates are taken in chunks of layers whose recorded inputs fit a byte budget (2 GiB per rank by
  default, or `mask_chunk_layers`), optionally held in CPU memory (`offload_activations`).
- `grad`: I(l) = sum over the layer's parameters of |theta * dL/dtheta| (first-order Taylor).
- `fisher`: I(l) = sum over the layer's parameters of (dL/dtheta)^2.
L is the mean token loss over the whole probe set (all ranks), so scores do not depend on how many
processes computed them. The model runs on the device the launcher gives, in `dtype` (`auto`: the
checkpoint's dtype on GPU, fp32 on CPU); losses and sums are accumulated in float64 on the CPU. With the
document mask (`packing`, as data.document_mask in training) the blocks carry their position ids.

A probe result is JSON: `{"format": "adept_ds.probe/1", "method": ..., "num_layers": L,
"scores": [one float per original decoder layer], "base_loss": ..., "model_fingerprint": ..., ...}`;
a mask probe adds `mask_chunk_layers` and `recorded_activation_peak_bytes` (per rank).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from adept_ds.data.blocks import Batch, Packing
from adept_ds.model.families import Family
from adept_ds.probe.mask import mask_loss_sums
from adept_ds.probe.runtime import ProbeRuntime, loss_sum, plain_runtime

PROBE_FORMAT = "adept_ds.probe/1"


def read_probe_result(path: str | Path) -> dict:
    """Load and validate a probe result file."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"probe result file {path} does not exist (write one with `adept-ds probe`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read probe result file {path}: {err}") from err
    if not isinstance(result, dict) or result.get("format") != PROBE_FORMAT:
        found = result.get("format") if isinstance(result, dict) else type(result).__name__
        raise ValueError(f"{path} is not an adept_ds probe result (format {found!r}, expected {PROBE_FORMAT!r})")
    scores = result.get("scores")
    if not isinstance(scores, list) or not scores or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise ValueError(f"probe result {path}: 'scores' must be a non-empty list of finite numbers")
    if result.get("num_layers", len(scores)) != len(scores):
        raise ValueError(f"probe result {path}: num_layers={result['num_layers']} but {len(scores)} scores")
    return result


def rank_layers(scores: list[float]) -> list[int]:
    """Layer indices from least to most important; ties go to the lower index (stable sort)."""
    return sorted(range(len(scores)), key=scores.__getitem__)


def least_important_layers(scores: list[float], k: int) -> list[int]:
    """Indices of the k lowest-scoring layers, ascending."""
    if not isinstance(k, int) or not 1 <= k <= len(scores):
        raise ValueError(f"k={k} is out of range: choose between 1 and the number of layers ({len(scores)})")
    return sorted(rank_layers(scores)[:k])


def layers_from_probe(path: str | Path, k: int, model_fingerprint: str, num_layers: int) -> list[int]:
    """The k least important layers of a probe result, after checking it was measured on this model."""
    return least_important_layers(probe_result_for(path, model_fingerprint, num_layers)["scores"], k)


def probe_result_for(path: str | Path, model_fingerprint: str, num_layers: int) -> dict:
    """A probe result, after checking it was measured on this model (its layer count and fingerprint)."""
    result = read_probe_result(path)
    if len(result["scores"]) != num_layers:
        raise ValueError(
            f"probe result {path} scores {len(result['scores'])} layers but the model has {num_layers}: "
            "it was measured on a different model"
        )
    probed = result.get("model_fingerprint")
    if probed is not None and probed != model_fingerprint:
        raise ValueError(
            f"probe result {path} was measured on a different model (fingerprint {probed}, this model is "
            f"{model_fingerprint}); rerun `adept-ds probe` on this model"
        )
    return result


METHODS = ("mask", "grad", "fisher")


def gradient_sums(family: Family, runtime: ProbeRuntime) -> torch.Tensor:
    """Per layer: [sum |theta * g|, sum g^2] over this rank's (partition of the) layer parameters."""
    layers = family.decoder_layers(runtime.model)
    sums = torch.zeros(2, len(layers), dtype=torch.float64)
    for index, layer in enumerate(layers):
        for param in layer.parameters():
            theta, grad = runtime.local_param_grad(param)
            if grad is None:
                continue
            theta, grad = theta.double(), grad.double()
            sums[0, index] += (theta * grad).abs().sum().cpu()
            sums[1, index] += (grad * grad).sum().cpu()
    return sums


def probe_scores(
    family: Family,
    runtime: ProbeRuntime,
    batches: list[tuple[Batch | torch.Tensor, float]],
    method: str,
    total_tokens: int,
    show_progress: bool = True,
    mask_chunk_layers: int | None = None,
    offload_activations: bool = False,
) -> tuple[list[float], float, int | None]:
    """Per-layer scores and the base loss over the whole probe set (every rank gets the same numbers), and
    for `mask` this rank's peak bytes of recorded layer inputs (None for the gradient methods).

    `batches` are this rank's (blocks, weight) pairs (a `Batch`, or a tensor of blocks); `total_tokens` counts
    predicted tokens on all ranks.
    All ranks must pass the same number of batches (pad with zero-weight repeats) and the same
    `mask_chunk_layers` (default: all layers), because ZeRO-3 gathers weights collectively in every forward.
    """
    if method not in METHODS:
        raise ValueError(f"unknown probe method {method!r}: choose one of {', '.join(METHODS)}")
    layers = family.decoder_layers(runtime.model)
    progress = tqdm(batches, desc=f"probe ({method})", unit="batch", disable=not show_progress or runtime.rank != 0)
    if method == "mask":
        sums, peak = torch.zeros(len(layers) + 1, dtype=torch.float64), 0
        for batch, weight in progress:
            batch = Batch.of(batch).to(runtime.device)
            batch_sums, batch_peak = mask_loss_sums(family, runtime.model, batch, mask_chunk_layers, offload_activations)
            sums += weight * batch_sums.cpu()
            peak = max(peak, batch_peak)
        sums = runtime.all_reduce_sum(sums)
        base = sums[0].item() / total_tokens
        return [(masked / total_tokens) - base for masked in sums[1:].tolist()], base, peak

    base_sum = torch.zeros(1, dtype=torch.float64)
    for batch, weight in progress:
        batch = Batch.of(batch).to(runtime.device)
        batch_loss = loss_sum(runtime(**batch.model_inputs(labels=False), use_cache=False).logits[:, :-1], batch.targets)
        base_sum += weight * batch_loss.detach().cpu()
        # d(mean loss over all ranks' tokens)/d(theta): each rank contributes its share of the sum.
        runtime.backward(weight * batch_loss / total_tokens)
    sums = runtime.all_reduce_sum(torch.cat([gradient_sums(family, runtime).flatten(), base_sum]))
    per_layer = sums[:-1].reshape(2, len(layers))
    scores = per_layer[0] if method == "grad" else per_layer[1]
    return scores.tolist(), sums[-1].item() / total_tokens, None


def shard_batches(blocks: Batch | torch.Tensor, rank: int, world_size: int, batch_size: int) -> list[tuple[Batch | torch.Tensor, float]]:
    """This rank's blocks (round robin), in batches, padded with zero-weight repeats to the same count on every rank."""
    per_rank = math.ceil(len(blocks) / world_size)
    num_batches = math.ceil(per_rank / batch_size)
    mine = blocks[rank::world_size]
    batches = [(mine[i : i + batch_size], 1.0) for i in range(0, len(mine), batch_size)]
    while len(batches) < num_batches:
        batches.append((blocks[:1], 0.0))
    return batches


def write_probe_result(path: str | Path, result: dict) -> None:
    """Write the result JSON atomically and a bar chart of the scores beside it (`<name>.png`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    staging.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(staging, path)
    plot_probe_result(result, path.with_suffix(".png"))


def plot_probe_result(
    result: dict, path: Path, selected: list[int] | None = None, threshold: float | None = None, title: str | None = None
) -> None:
    """Bar chart of the scores, `selected` layers (default: the 4 least important) in orange, written atomically;
    `threshold` draws a horizontal line at that score, `title` replaces the default title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result["scores"]
    selected = set(selected if selected is not None else result.get("least_important", [])[:4])
    colors = ["tab:orange" if layer in selected else "tab:blue" for layer in range(len(scores))]
    figure, axes = plt.subplots(figsize=(max(6, len(scores) * 0.3), 3.5))
    axes.bar(range(len(scores)), scores, color=colors)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel({"mask": "loss increase when bypassed", "grad": "sum |theta * grad|", "fisher": "sum grad^2"}[result["method"]])
    if threshold is not None:
        axes.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
        axes.legend(loc="upper right")
    axes.set_title(title or f"general-competence importance ({result['method']}); orange: {len(selected)} least important", fontsize=9)
    # Log scale for the gradient methods' sums, and where a threshold near the bottom must stay readable.
    if result["method"] != "mask" or (threshold is not None and min(scores) > 0):
        axes.set_yscale("log")
    staging = path.with_name(f".{path.stem}.partial-{os.getpid()}.png")
    figure.tight_layout()
    figure.savefig(staging, dpi=120)
    plt.close(figure)
    os.replace(staging, path)


DTYPES = ("auto", "float32", "bfloat16")


def probe_dtype(dtype: str, config: dict, cpu: bool) -> torch.dtype:
    """The dtype to probe in. `auto`: on GPU the checkpoint's (an fp16 checkpoint runs in bf16: the same
    memory, and fp32's range, so small gradients do not underflow without loss scaling), else fp32; on
    CPU fp32, since bf16 matmuls there are slow and round more."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown probe dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    saved = config.get("dtype") or config.get("torch_dtype")
    return torch.bfloat16 if not cpu and saved in ("bfloat16", "float16") else torch.float32


def probe_model(
    model_dir: str | Path,
    data: str | Path,
    output: str | Path,
    method: str = "mask",
    max_tokens: int = 65536,
    block_size: int = 256,
    batch_size: int = 4,
    text_field: str = "text",
    show_progress: bool = True,
    seed: int | None = None,
    dtype: str = "auto",
    mask_chunk_layers: int | None = None,
    offload_activations: bool = False,
    packing: Packing = Packing(),
) -> dict:
    """`adept-ds probe`: score every decoder layer of `model_dir` on the general corpus `data`.

    The probe uses the corpus's first `max_tokens` tokens, or with `seed` that many tokens of blocks drawn
    from the whole corpus by a seeded shuffle (so repeated studies vary the probe batches).

    Launched under `deepspeed`/`torchrun` it shards the blocks across ranks and runs on ZeRO-3
    partitions; as a plain process it runs on whole weights. Either way on the GPU when there is one, in
    `dtype` (see `probe_dtype`). The mask probe takes the bypass candidates `mask_chunk_layers` at a time,
    by default as many as fit `mask.ACTIVATION_BUDGET_BYTES` of recorded inputs per rank;
    `offload_activations` holds those in CPU memory. Rank 0 writes the result and chart.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adept_ds.data.blocks import load_blocks, store_batch, usable_blocks
    from adept_ds.data.sampler import sample_order
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.demo_model import cache_root
    from adept_ds.model.families import get_family
    from adept_ds.probe.mask import default_chunk_layers
    from adept_ds.runtime.distributed import init_distributed, launched_distributed, on_cpu

    # Everything a user can get wrong is checked before any process group or model load.
    if method not in METHODS:
        raise ValueError(f"unknown probe method {method!r}: choose one of {', '.join(METHODS)}")
    if block_size < 2:
        raise ValueError(f"block size {block_size} is too small: use at least 2 tokens")
    if max_tokens < block_size:
        raise ValueError(f"token budget --max-tokens {max_tokens} is smaller than one block of {block_size} tokens")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if mask_chunk_layers is not None and mask_chunk_layers < 1:
        raise ValueError(f"--mask-chunk-layers {mask_chunk_layers} must be at least 1")
    checkpoint = open_checkpoint(model_dir)
    family = get_family(checkpoint.config.get("model_type"))
    cpu = on_cpu()
    torch_dtype = probe_dtype(dtype, checkpoint.config, cpu)
    if method == "mask" and mask_chunk_layers is None:
        # From the nominal batch shape, not each rank's own first batch: every rank must chunk alike.
        layer_input_bytes = batch_size * block_size * checkpoint.config["hidden_size"] * torch_dtype.itemsize
        mask_chunk_layers = default_chunk_layers(checkpoint.config["num_hidden_layers"], layer_input_bytes)
    if not Path(data).exists():
        raise ValueError(f"probe corpus {data} does not exist")

    # The blocks before the process group (see data/blocks.py); a raw corpus is tokenised only as far as the budget.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix = max_tokens if seed is None else None
    vocab_size = checkpoint.config.get("vocab_size")
    store = load_blocks(data, tokenizer, block_size, cache_root() / "blocks", text_field, prefix, vocab_size, documents=packing.setting())
    num_blocks = usable_blocks(store, max_tokens)
    blocks = store_batch(store, range(num_blocks) if seed is None else sample_order(len(store), seed, 0, num_blocks), packing)
    distributed = launched_distributed()
    rank, world_size = init_distributed() if distributed else (0, 1)
    batches = shard_batches(blocks, rank, world_size, batch_size)
    total_tokens = blocks.predicted  # every position but the first of a block (and the document starts dropped)

    with_grad = method != "mask"
    if distributed:
        from adept_ds.probe.runtime import zero3_probe_runtime

        runtime = zero3_probe_runtime(model_dir, family, with_grad, batch_size, len(batches), torch_dtype)
    else:
        device = None if cpu else torch.device("cuda", torch.cuda.current_device())
        runtime = plain_runtime(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, device_map=device), family, with_grad)
    if not cpu:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on tensor cores (TF32); no effect on bf16
    scores, base_loss, activation_peak = probe_scores(
        family, runtime, batches, method, total_tokens, show_progress, mask_chunk_layers, offload_activations
    )
    result = {
        "format": PROBE_FORMAT,
        "method": method,
        "num_layers": len(scores),
        "scores": scores,
        "least_important": rank_layers(scores),
        "base_loss": base_loss,
        "model": str(Path(model_dir).absolute()),
        "model_fingerprint": fingerprint_checkpoint(checkpoint),
        "data": str(Path(data).absolute()),
        "data_fingerprint": store.fingerprint,
        "num_blocks": num_blocks,
        "block_size": block_size,
        "num_tokens": num_blocks * block_size,
        "seed": seed,
        "world_size": world_size,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "document_mask": packing.document_mask,
        "loss_on_document_start": packing.loss_on_document_start,
    }
    if method == "mask":
        result.update(
            mask_chunk_layers=min(mask_chunk_layers, len(scores)),
            offload_activations=offload_activations,
            recorded_activation_peak_bytes=activation_peak,
        )
    if rank == 0:
        write_probe_result(output, result)
    if distributed:
        from adept_ds.runtime.distributed import shutdown_distributed

        del runtime
        shutdown_distributed()
    return result
