"""`adept-ds plan`: what a run needs per rank, before it is queued.

A plan is a sum of named terms in bytes, each computed from the model's tensor shapes (built on the meta
device: no weights are read), the run config and the DeepSpeed config as `resolve_run` (training/resolve.py) resolves it for that
world size. Every term is one line of `Plan.rows`, so a user can see where the memory goes:

Training under ZeRO-3, per rank (W ranks; n elements of a tensor; part(n) = ceil(n / W), DeepSpeed's padded
partition; d = 2 bytes in bf16 runs, 4 in fp32; g = 4 with fp32 gradient accumulation, else d):
- parameters: every tensor's part(n) * d, plus the whole tensor again for those below
  `stage3_param_persistence_threshold` (norms: ZeRO-3 keeps them gathered); with train.frozen_weights=replicated
  the frozen tensors count whole (n * d) and only the trainable ones are partitioned;
- fp32 master weights and AdamW's two moments: 4 + 8 bytes per trainable part(n);
- gradient partitions: g per trainable part(n); the reduce bucket: `reduce_bucket_size` * d (on CPU only
  the pages gradients ever fill: min(bucket, trainable parameters));
- the ZeRO-3 window: gathered weights, `stage3_max_live_parameters` plus the largest non-layer tensor
  (the embedding or LM head, gathered whole while layers are live), in d; with replicated frozen weights, at
  most the trainable tensors;
- with ZeRO++ hpZ (train.zeropp=hpz, H ranks per secondary shard): each partitioned tensor's secondary shard,
  ceil(n / H) * d (a frozen weight keeps it for the run, a trainable one between its forward and the step);
- activations of one micro-batch (T = micro batch * block tokens) in every layer that gets a backward, from the
  lowest trainable layer up: `layer_activation_bytes` (counted from HF's Llama code with SDPA attention,
  tests/test_plan.py checks it against saved-tensor hooks); with activation checkpointing each of those
  layers keeps only its input (T * h * d) and one layer is recomputed at a time;
- then the larger of two moments: the end of forward, with the LM loss working on one chunk
  (adept_ds/model/lm_loss.py: its fp32 logits and logsumexp's temporary; HF's loss in fp16: the whole T x vocab logits,
  fp32 copy, log-softmax, gradient), and the backward of the top layer (recomputed when checkpointed), with its
  activation gradients, T * (3 * intermediate + 2 * h) * d, and its largest weight's gradient before it reaches
  the bucket. Both hold d loss / d hidden (T * h * d) and, when the head trains, its fp32 weight gradient.
Unit importance runs the same forward and backward on `importance.batch_size` blocks and keeps a float64
sum of |g| per trainable partition element. The probe runs on ZeRO-3 partitions (no gradients) with its
recorded inputs capped by `probe/mask.ACTIVATION_BUDGET_BYTES`. Export runs on one host: the largest base
shard, the trained tensors in fp32 and one tensor being assembled (benchmarks/scale.py measured it).
A checkpoint holds, per rank, the fp32 master and both moments of its trainable partitions (12 bytes per
part(n)) and AdamW's step (4 bytes per parameter group); frozen weights are never saved.

On a GPU the sum is what `torch.cuda.max_memory_allocated` would report; the CUDA context, NCCL buffers and
the caching allocator's fragmentation come on top (GPU_ALLOWANCE, by cause), so a plan fits when the sum plus
GPU_RESERVE_BYTES stays under the device's memory. On CPU (fp32, used to validate the model on this machine: benchmarks/plan_check.py)
the peak RSS adds a process's fixed cost (CPU_RUNTIME_BYTES: torch, DeepSpeed, gloo, the tokenizer).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from adept_ds.run.config import RunConfig

GIB = 2**30
SHOWN_BYTES = GIB // 20
"""Terms below this (0.05 GiB) are counted but not listed."""


@dataclass(frozen=True)
class GpuAllowance:
    """What a GPU rank holds beyond `torch.cuda.max_memory_allocated` (the planner's sum), by cause. Estimates from
    vendors' and DeepSpeed's figures, not yet measured here: benchmarks/gpu_check.py measures each part on a GPU."""

    cuda_context: int = GIB
    """The CUDA context, loaded kernels and cuBLAS workspaces: ~0.5-1 GiB on Hopper with CUDA 12 (lazy module loading)."""
    nccl_buffers: int = GIB
    """NCCL's communicators: NCCL_BUFFSIZE (4 MiB) per channel and peer, for the world group and any hpZ subgroup."""
    fragmentation: int = 2 * GIB
    """The caching allocator's reserved-but-unallocated blocks at the peak: ZeRO-3 gathers and frees buffers of
    many sizes every layer."""

    @property
    def total(self) -> int:
        return self.cuda_context + self.nccl_buffers + self.fragmentation

    def describe(self) -> str:
        return (
            f"CUDA context {_gb(self.cuda_context)} + NCCL buffers {_gb(self.nccl_buffers)} + fragmentation {_gb(self.fragmentation)} GiB"
        )


GPU_ALLOWANCE = GpuAllowance()
GPU_RESERVE_BYTES = GPU_ALLOWANCE.total
"""A GPU plan fits when its sum plus this (4 GiB) is under the device's memory."""
CPU_RUNTIME_BYTES = 216 * 2**20
"""A CPU rank's RSS beyond the terms above (libraries loaded by the engine, gloo, tokenizer, token stores, TensorBoard):
benchmarks/plan_check.py's `tiny` run (2 layers of width 64) grew by 249 MB, of which its terms are 33 MB."""
TRAINING_PHASES = ("train", "importance")
PROBE_BLOCKS, PROBE_BLOCK_SIZE = 4, 256
"""`adept-ds probe`'s default batch: 4 blocks of 256 tokens per rank."""
DEFAULT_SHARD_BYTES = 5 * 10**9
"""Base checkpoint shard size assumed when the model directory has no weights (HF's default max_shard_size)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    layer: int | None  # decoder layer index in the trained (expanded) model; None for embedding, norm, head


@dataclass(frozen=True)
class ModelShape:
    """The trained model's tensors and the numbers activations depend on."""

    config: dict
    tensors: tuple[Tensor, ...]
    num_layers: int
    trainable_layers: tuple[int, ...]
    """Decoder layers that train (expanded model indices); every layer for pt_full."""
    trains_everything: bool
    placement: str
    """Where the trainable layers come from (manifest, probe, or an assumption), for the report."""
    shard_bytes: tuple[int, ...]
    """The base checkpoint's shard files (estimated when it has no weights)."""

    @property
    def hidden(self) -> int:
        return self.config["hidden_size"]

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.hidden // self.config["num_attention_heads"]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def trainable(self) -> list[Tensor]:
        if self.trains_everything:
            return list(self.tensors)
        return [t for t in self.tensors if t.layer in self.trainable_layers]

    @property
    def param_groups(self) -> int:
        """Optimizer groups: one per unit (a projection or norm of a trainable layer); pt_full has one."""
        from adept_ds.model.families import get_family

        return 1 if self.trains_everything else len(self.trainable_layers) * len(get_family(self.config["model_type"]).units)

    @property
    def lowest_trainable_layer(self) -> int:
        """Backward runs from the loss down to this layer (every layer for pt_full)."""
        return min(self.trainable_layers)

    @property
    def backward_layers(self) -> int:
        """Layers whose activations wait for backward: from the lowest trainable one up."""
        return self.num_layers - self.lowest_trainable_layer


def layer_activation_bytes(config: dict, tokens: int, dtype_bytes: int) -> int:
    """Bytes one Llama-family decoder layer saves for backward over `tokens` tokens (HF's code, SDPA attention).

    In the model's dtype: four tensors of the hidden width (among them both norms' outputs), q and
    the attention output at the query heads' width, k and v at the KV heads' width; gate and up outputs,
    SiLU(gate), their product; RoPE's cos and sin. In fp32: both RMSNorms' upcast input (HF normalises in fp32), SDPA's log-sum-exp per head,
    each norm's 1/rms.
    """
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_width = (config.get("num_key_value_heads") or heads) * head_dim
    in_dtype = 4 * hidden + 2 * heads * head_dim + 4 * config["intermediate_size"] + 2 * kv_width + 2 * head_dim
    in_fp32 = 2 * hidden + heads + 2
    return tokens * (dtype_bytes * in_dtype + 4 * in_fp32)


def _meta_tensors(config: dict) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(tensors outside the decoder layers, tensors of one layer) of this architecture, from a one-layer meta model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adept_ds.model.families import get_family

    family = get_family(config.get("model_type"))
    one_layer = dict(config, num_hidden_layers=1)
    for key in family.per_layer_config_keys:
        if isinstance(one_layer.get(key), list):
            one_layer[key] = one_layer[key][:1]
    hf_config = AutoConfig.for_model(**{k: v for k, v in one_layer.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    outside, layer = [], []
    for name, param in model.named_parameters():
        split = family.split_layer_key(name)
        (layer if split else outside).append((split[1] if split else name, param.numel()))
    return outside, layer


def model_shape(config: RunConfig, k: int | None = None) -> ModelShape:
    """The shape of the model `config` trains, from its `config.json` alone.

    An expanded model (`adept_expansion.json`) says where its copies are. For a model not yet expanded, `k`
    copies are planned; without a probe result their placement is unknown, so the lowest copy is assumed after
    layer 0, the most activation memory any placement needs.
    """
    from adept_ds.probe.layers import least_important_layers, read_probe_result

    model_dir = Path(config.model.path)
    config_file = model_dir if model_dir.is_file() else model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model={config.model.path!r}: no config.json there (give a model directory or its config.json)")
    hf = json.loads(config_file.read_text())
    manifest_file = config_file.parent / "adept_expansion.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    spec, layers = config.spec, hf["num_hidden_layers"]
    trainable: tuple[int, ...] = tuple(range(layers))
    placement = "every layer"
    if spec.trains == "copies":
        if manifest is not None:
            trainable, placement = tuple(manifest["copied_layers"]), f"the copies in {manifest_file.name}"
        else:
            copies = k if k is not None else config.k
            if not isinstance(copies, int) or not 1 <= copies <= layers:
                raise ValueError(f"--k {copies}: plan between 1 and {layers} copies (the model's layer count)")
            if config.probe:
                from adept_ds.model.expand import plan_expansion

                chosen = least_important_layers(read_probe_result(config.probe)["scores"], copies)
                trainable = tuple(i for i, (_, copy) in enumerate(plan_expansion(layers, chosen).layer_sources()) if copy)
                placement = f"{copies} copies after the probe's layers {sorted(chosen)}"
            else:
                trainable = (1,) + tuple(range(layers + 1, layers + copies))  # the lowest after layer 0
                placement = f"{copies} copies, lowest after layer 0 (no expansion manifest or probe: the worst case)"
            layers += copies
    elif spec.trains == "probe_layers":
        chosen = least_important_layers(read_probe_result(config.probe)["scores"], config.k) if config.probe else [0]
        trainable = tuple(sorted(chosen))
        placement = f"layers {list(trainable)}" if config.probe else "lowest trained layer 0 (no probe result: the worst case)"
    outside, per_layer = _meta_tensors(hf)
    tensors = [Tensor(name, numel, None) for name, numel in outside]
    tensors += [Tensor(f"layers.{index}.{name}", numel, index) for index in range(layers) for name, numel in per_layer]
    base_dir = config_file.parent
    shards = tuple(path.stat().st_size for path in sorted(base_dir.glob("*.safetensors")))
    if not shards:
        dtype_bytes = 2 if hf.get("torch_dtype", hf.get("dtype", "bfloat16")) in ("bfloat16", "float16") else 4
        base_bytes = dtype_bytes * (sum(n for _, n in outside) + hf["num_hidden_layers"] * sum(n for _, n in per_layer))
        shards = (DEFAULT_SHARD_BYTES,) * (base_bytes // DEFAULT_SHARD_BYTES) + (
            (base_bytes % DEFAULT_SHARD_BYTES,) if base_bytes % DEFAULT_SHARD_BYTES else ()
        )
    return ModelShape(
        config=dict(hf, num_hidden_layers=layers),
        tensors=tuple(tensors),
        num_layers=layers,
        trainable_layers=trainable,
        trains_everything=spec.trains == "all",
        placement=placement,
        shard_bytes=shards,
    )


@dataclass
class Phase:
    """One stage's peak per rank: named terms in bytes."""

    name: str
    terms: dict[str, int] = field(default_factory=dict)
    where: str = "device"

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class Plan:
    world_size: int
    device_bytes: int | None
    gpu: bool
    phases: dict[str, Phase]
    checkpoint_bytes_per_rank: int
    checkpoint_files: int
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint_bytes(self) -> int:
        return self.checkpoint_bytes_per_rank * self.world_size

    def needed(self, phase: str) -> int:
        """What the phase needs of the device: the allocator's peak plus what it does not see."""
        extra = GPU_RESERVE_BYTES if self.gpu else CPU_RUNTIME_BYTES
        return self.phases[phase].total + (extra if self.phases[phase].where == "device" else 0)

    def fits(self, phase: str) -> bool:
        return self.device_bytes is None or self.phases[phase].where != "device" or self.needed(phase) <= self.device_bytes

    def fits_training(self) -> bool:
        return all(self.fits(phase) for phase in TRAINING_PHASES if phase in self.phases)


def _partition(numel: int, world: int) -> int:
    return math.ceil(numel / world)


def plan_run(
    config: RunConfig,
    shape: ModelShape,
    world_size: int,
    gpu: bool,
    device_bytes: int | None,
    frozen_weights: str = "sharded",
    wide_window: bool = False,
) -> Plan:
    """Per-rank memory of every stage of `config` on `world_size` ranks, and its checkpoint size.

    `frozen_weights` and `wide_window`: the memory layout (adept_ds/run/memory_layout.py) training runs with."""
    from adept_ds.model.lm_loss import chunk_rows
    from adept_ds.probe.mask import ACTIVATION_BUDGET_BYTES
    from adept_ds.run.ds_config import resolve_ds_config

    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # ds_config's one-line notices, kept for the report (a plan is replanned often)
        ds = resolve_ds_config(config.deepspeed, config, world_size, gpu, shape.config, wide_window)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"{config.deepspeed}: the planner models ZeRO stage 3 only (this config has stage {zero.get('stage', 0)})")
    low_precision = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    d = 2 if low_precision else 4
    g = 4 if (d == 4 or ds.get("data_types", {}).get("grad_accum_dtype") == "fp32") else d
    W, h, vocab = world_size, shape.hidden, shape.config["vocab_size"]
    persist = zero.get("stage3_param_persistence_threshold", 100_000)
    trainable = shape.trainable()
    trainable_parts = sum(_partition(t.numel, W) for t in trainable)
    optimizer_offloaded = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    params_offloaded = zero.get("offload_param", {}).get("device") in ("cpu", "nvme")

    sharded_params = sum(_partition(t.numel, W) * d + (t.numel * d if t.numel < persist else 0) for t in shape.tensors)
    live = zero.get("stage3_max_live_parameters", 1_000_000_000)
    replicated = frozen_weights == "replicated" and not shape.trains_everything
    if replicated:  # the frozen tensors whole; ZeRO-3 partitions and gathers only the trainable ones
        trainable_numel = sum(t.numel for t in trainable)
        frozen_numel = shape.numel - trainable_numel
        parameters = frozen_numel * d + sum(_partition(t.numel, W) * d + (t.numel * d if t.numel < persist else 0) for t in trainable)
        window = min(live, trainable_numel) * d
    else:
        parameters = sharded_params
        outside_layers = max(t.numel for t in shape.tensors if t.layer is None)
        window = min(live + outside_layers, shape.numel) * d
    parameters_term = "parameters (frozen whole + trainable partitions)" if replicated else "parameters (partitions + persistent norms)"
    hpz = zero.get("zero_hpz_partition_size", 1)
    managed = trainable if replicated else shape.tensors  # what ZeRO-3 partitions (persistent norms stay whole)
    secondary = sum(_partition(t.numel, hpz) * d for t in managed if t.numel >= persist) if hpz > 1 else 0
    bucket = int(zero.get("reduce_bucket_size", 500_000_000))
    bucket = bucket if gpu else min(bucket, sum(t.numel for t in trainable))

    def step_terms(blocks: int) -> dict[str, int]:
        """What one micro-batch adds at its peak: the end of forward (every saved activation and the loss's
        chunk) or the backward of the top layer (the saved activations, that layer recomputed when checkpointed,
        its gradient temporaries), whichever is larger."""
        tokens = blocks * config.data.block_size
        layer = layer_activation_bytes(shape.config, tokens, d)
        n = shape.backward_layers
        if config.train.activation_checkpointing:
            saved = {f"activations ({n} checkpointed layer inputs)": n * tokens * h * d}
        else:
            saved = {f"activations ({n} layers)": n * layer}
        incoming = {"d loss / d hidden": tokens * h * d}
        if shape.trains_everything:
            incoming["LM head's fp32 weight gradient"] = vocab * h * 4  # summed over the loss's chunks
        if config.train.chunked_loss and not ds.get("fp16", {}).get("enabled"):
            # One chunk's logits in fp32 and logsumexp's fp32 temporary (the low-precision copies are shorter-lived).
            loss = min(chunk_rows(vocab, gpu), tokens) * vocab * 8
        else:  # HF's: the logits, their fp32 copy, log-softmax and its gradient, all tokens at once
            loss = tokens * vocab * (d + 12)
        at_loss = {**saved, **incoming, "LM loss (one chunk) and final norm": loss + tokens * h * (4 + d)}
        largest_trainable = max(t.numel for t in trainable)
        in_backward = {**saved, **incoming}
        if config.train.activation_checkpointing:
            in_backward["one layer recomputed"] = layer
        in_backward["backward temporaries (one layer)"] = (
            tokens * (3 * shape.config["intermediate_size"] + 2 * h) * d + largest_trainable * d
        )
        return max(at_loss, in_backward, key=lambda terms: sum(terms.values()))

    states = {
        parameters_term: 0 if params_offloaded else parameters,
        "fp32 master + AdamW moments": 0 if optimizer_offloaded else trainable_parts * 12,
        "gradient partitions": 0 if optimizer_offloaded else trainable_parts * g,
        "reduce bucket": bucket * d,
        "ZeRO-3 window (gathered weights)": window,
        **({f"hpZ secondary shards (1/{hpz} of ZeRO-managed weights)": secondary} if hpz > 1 else {}),
    }
    phases = {"train": Phase("train", {**states, **step_terms(config.train.micro_batch_size)})}
    if optimizer_offloaded or params_offloaded:
        host = (trainable_parts * (12 + g) if optimizer_offloaded else 0) + (parameters if params_offloaded else 0)
        phases["train (host, per rank)"] = Phase("train (host, per rank)", {"offloaded states": host}, where="host")
    if config.adaptive_lr:
        terms = {**states, **step_terms(config.importance.batch_size)}
        terms["|g| sums (float64)"] = trainable_parts * 8
        phases["importance"] = Phase("importance", terms)
    probe_tokens = PROBE_BLOCKS * PROBE_BLOCK_SIZE
    base_layers = shape.config["num_hidden_layers"] - (0 if shape.trains_everything else len(shape.trainable_layers))
    phases["probe"] = Phase(
        "probe",
        {
            "parameters (partitions + persistent norms)": sharded_params,
            "ZeRO-3 window (gathered weights)": min(live + max(t.numel for t in shape.tensors if t.layer is None), shape.numel) * d,
            "recorded layer inputs": min(ACTIVATION_BUDGET_BYTES, base_layers * probe_tokens * h * d),
            "one layer's forward": probe_tokens * (3 * shape.config["intermediate_size"] + 4 * h) * d,
            "logits and loss": probe_tokens * vocab * (d + 4),
        },
    )
    trained_bytes = sum(t.numel for t in trainable) * 4
    phases["export"] = Phase(
        "export",
        {
            "largest base shard (read, then rewritten)": max(shape.shard_bytes),
            "one trained tensor assembled in fp32 and cast": 6 * max(t.numel for t in trainable),
            "trained fp32 weights, memory-mapped (page cache)": trained_bytes,
        },
        where="host",
    )
    plan = Plan(
        world_size=W,
        device_bytes=device_bytes,
        gpu=gpu,
        phases=phases,
        checkpoint_bytes_per_rank=trainable_parts * 12 + 4 * shape.param_groups,  # + AdamW's fp32 step per group
        checkpoint_files=W,
    )
    plan.notes += said.getvalue().splitlines()
    return plan


def _gb(value: int) -> str:
    return f"{value / GIB:,.1f}"
