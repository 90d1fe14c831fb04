"""Run configuration: one typed tree of dataclasses, read from YAML, overridable by `key.sub=value`.

Every field is validated in `__post_init__` with an error naming the bad value and what is valid.
Unknown keys are rejected with the closest known key as a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class MethodSpec:
    """What a training method trains and how (the paper's ADEPT and its comparison points)."""

    expanded: bool
    """The model must be an expanded checkpoint (with `adept_expansion.json`)."""
    trains: str
    """copies: the manifest's copied layers; probe_layers: the k least important original layers; all."""
    adaptive_lr: bool
    """Unit importance is measured and sets the LR (else one uniform LR)."""
    matched_lr: bool = False
    """With adaptive_lr: every unit gets the mean of the adaptive scales (the matched-LR ablation)."""


METHOD_SPECS = {
    "adept": MethodSpec(expanded=True, trains="copies", adaptive_lr=True),
    "pt_full": MethodSpec(expanded=False, trains="all", adaptive_lr=False),
    "llama_pro": MethodSpec(expanded=True, trains="copies", adaptive_lr=False),
    "adept_no_stage1": MethodSpec(expanded=False, trains="probe_layers", adaptive_lr=True),
    "adept_no_stage2": MethodSpec(expanded=True, trains="copies", adaptive_lr=False),
    "adept_no_stage2_matched": MethodSpec(expanded=True, trains="copies", adaptive_lr=True, matched_lr=True),
}
METHODS = tuple(METHOD_SPECS)
DEEPSPEED_SCHEDULERS = ("WarmupCosineLR", "WarmupLR", "WarmupDecayLR")
SCHEDULERS = (*DEEPSPEED_SCHEDULERS, "constant", "linear", "cosine", "warmup_stable_decay")
DECAY_TYPES = ("linear", "sqrt", "cosine")
LR_MAPPINGS = ("linear", "power", "uniform")
NORMALIZATIONS = ("global", "per_type", "rank")
NONFINITE_POLICIES = ("skip", "stop")
FROZEN_WEIGHTS = ("auto", "sharded", "replicated")
ZEROPP = ("off", "hpz", "qwz", "hpz+qwz")
GUARD_ACTIONS = ("stop", "rollback", "cool")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
REPORT_SINKS = ("tensorboard", "wandb", "mlflow")


def corpus_name(path: str) -> str:
    """A source's default name: its file or directory name less format suffixes (`domain.jsonl.gz` -> domain)."""
    name = Path(path).name
    while Path(name).suffix.lower() in (".gz", ".zst", ".zstd", ".jsonl", ".json", ".txt", ".text", ".parquet"):
        name = Path(name).stem
    return name or Path(path).name


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class DataSource:
    """One corpus of the training stream and its share of the samples."""

    name: str
    path: str
    weight: float
    text_field: str = "text"
    """The source's text field in JSONL/Parquet records (default: data.text_field)."""
    self_generated: bool = False
    """The source is text sampled from the run's base model by `adept-ds make-probe-corpus` (self-replay): check and
    train verify it against the manifest beside it (data/self_replay.py)."""


SOURCE_KEYS = ("path", "weight", "name", "text_field", "self_generated")
"""The keys a mixture source's mapping may carry."""


@dataclass(kw_only=True)
class DataConfig:
    domain: str | list = ""
    """Domain corpus for continual pretraining: a token store (`adept-ds prepare-data`), a JSONL/JSON, text or Parquet
    file or directory, or a `datasets` dir. Or a mixture: a list of sources, each `{path: P, weight: W}` (optionally
    `name: N`, `text_field: F`, and `self_generated: true` for a JSONL `adept-ds make-probe-corpus` sampled from the
    run's base model) or a plain path (weight 1), e.g. the domain corpus plus general replay. Weights are shares of
    samples."""
    general: str = ""
    """General-competence probe corpus, used for unit importance."""
    general_eval: str = ""
    """Held-out general corpus for validation during training (eval.interval); default: the last blocks of
    data.general, which the importance probe then never draws."""
    domain_eval: str = ""
    """Held-out domain corpus for validation; default: the last blocks of data.domain (of its first source in a
    mixture), which training then never draws."""
    text_field: str = "text"
    """Name of the text field in JSONL/Parquet records."""
    block_size: int = 256
    """Tokens per training sample (documents are packed and cut into blocks)."""
    document_mask: bool = False
    """A token attends only to earlier tokens of its own document, not to the documents packed before it in its
    block: each block's position ids restart at 0 at every document start (a block that begins inside a document
    starts that part at 0 too), and transformers masks attention across them. Training, validation and unit
    importance all pass them (give `adept-ds probe` and `eval` --document-mask to match); the token stores must record
    document boundaries (format 2, `adept-ds prepare-data`)."""
    loss_on_document_start: bool = True
    """Score each document's first token, which the previous document's last token (its EOS) predicts: with
    document_mask it is predicted from the previous document alone. false drops that label (Megatron's
    eod_mask_loss); with document_mask a packed block's loss then equals its documents' losses scored separately."""
    cache_dir: str = ""
    """Cache of token stores prepared from raw corpora; default `$ADEPT_DS_CACHE/blocks`."""

    def __post_init__(self):
        _check(isinstance(self.block_size, int) and self.block_size >= 2, f"data.block_size={self.block_size!r}: need an int >= 2")
        self.domain_sources()  # a malformed mixture fails here, with the source named

    def domain_sources(self) -> list[DataSource]:
        """The training stream's sources: one (weight 1) for a plain path, else the mixture's."""
        from adept_ds.data.sampler import check_weights

        entries = self.domain if isinstance(self.domain, list) else [self.domain]
        _check(bool(entries), "data.domain=[]: give a corpus or a list of {path, weight} sources")
        sources = []
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"path": entry}
            _check(
                isinstance(entry, dict) and isinstance(entry.get("path"), str) and set(entry) <= set(SOURCE_KEYS),
                f"data.domain[{index}]={entry!r}: a source is a path or a mapping with path, weight and optionally name, "
                "text_field and self_generated",
            )
            self_generated = entry.get("self_generated", False)
            _check(
                isinstance(self_generated, bool),
                f"data.domain[{index}].self_generated={self_generated!r}: need true or false",
            )
            path, text_field = entry["path"], entry.get("text_field", self.text_field)
            _check(isinstance(text_field, str) and bool(text_field), f"data.domain[{index}].text_field={text_field!r}: need a field name")
            name = str(entry.get("name") or (corpus_name(path) if path else "domain"))
            weight = entry.get("weight", 1.0)
            sources.append(DataSource(name=name, path=path, weight=weight, text_field=text_field, self_generated=self_generated))
        try:
            check_weights([source.weight for source in sources])
        except ValueError as err:
            raise ValueError(f"data.domain: {err}") from None
        names = [source.name for source in sources]
        _check(len(set(names)) == len(names), f"data.domain: source names {names} repeat; give each source a distinct name")
        return sources


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Expanded model from `adept-ds expand` (adept, llama_pro, adept_no_stage2), or the original (pt_full,
    adept_no_stage1). `model: DIR` (and the override `model=DIR`) is short for `model.path: DIR`."""
    attn_implementation: str = "auto"
    """The attention kernel the model is loaded with: sdpa, eager, flash_attention_2 (a GPU, the flash-attn package,
    bf16 or fp16) or flex_attention (no backward on CPU). auto: flash_attention_2 on a GPU in bf16/fp16 when
    flash-attn is installed, else sdpa. Every one of them honours data.document_mask; the run prints its choice."""

    def __post_init__(self):
        _check(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            f"model.attn_implementation={self.attn_implementation!r}: choose one of {', '.join(ATTN_IMPLEMENTATIONS)}",
        )


@dataclass(kw_only=True)
class TrainConfig:
    micro_batch_size: int = 2
    """Blocks per rank per forward pass (DeepSpeed train_micro_batch_size_per_gpu)."""
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    """Optimizer steps to train (replaced by epochs when that is > 0)."""
    epochs: float = 0
    """Passes over data.domain (all its sources' blocks, less held-out ones): when > 0, max_steps = ceil(epochs x blocks
    / global batch), resolved once the corpus is read and printed; 0: max_steps."""
    seed: int = 0
    gradient_clipping: float = 1.0
    save_interval: int = 50
    """Save a DeepSpeed checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest this many complete checkpoints and delete older ones (0 keeps all). A checkpoint holds
    only what training changes (trainable weights, their optimizer state, the trainer state), never the frozen
    backbone, but at 70B scale even that is tens of GB per save."""
    log_interval: int = 1
    export: bool = True
    """Write a consolidated HF checkpoint to `<output_dir>/final` at the end."""
    nonfinite: str = "skip"
    """On a non-finite loss (checked before backward, so the weights never see it): skip drops that global
    batch and goes on; stop saves a checkpoint of the state before it and exits."""
    max_skipped_steps: int = 10
    """With nonfinite=skip, stop (after saving) once this many batches were dropped: the run is diverging."""
    timeout_minutes: float = 30.0
    """Process-group timeout: how long a collective may wait for a slow rank before the job fails (DeepSpeed's
    default is 10). Data preparation happens before the process group starts, so it never counts against it."""
    chunked_loss: bool = True
    """fp32 and bf16 runs: compute the LM head and cross-entropy a chunk of tokens at a time, in fp32 (the logits
    of a bf16 run upcast chunk by chunk, as HF's loss upcasts them all): HF's loss and gradients without the
    vocab-wide logits, their log-softmax and gradient in memory (adept_ds/model/lm_loss.py). fp16 runs use HF's loss."""
    activation_checkpointing: bool = False
    """Checkpoint the decoder layers from the lowest trainable one up (all layers for pt_full; the layers below get
    no backward): each keeps only its input and is recomputed in backward, non-reentrant, under ZeRO-3 too
    (adept_ds/training/activation_checkpointing.py). Same loss and gradients; most activation memory saved for one more
    forward through those layers. Off by default: on the demo it costs 15-28 % step time to save 7-10 % of a
    rank's memory (benchmarks/RESULTS.md); turn it on when activations do not fit (pt_full, 70B, 4k tokens: ~100 GB)."""
    frozen_weights: str = "auto"
    """ZeRO-3 runs: where the frozen backbone lives. sharded: partitioned like every weight, so each step all-gathers
    it for forward and again, from the lowest copy up, for backward (~2x the model in bytes per step). replicated:
    gathered once at the start and kept whole on every rank in the model's dtype; only the trainable units (and
    their optimizer state) stay partitioned, so a step all-gathers just those. auto: replicated when the memory
    plan (adept_ds/run/plan.py) fits in `memory_gb` with it, else sharded. ZeRO-1/2 replicate every weight anyway."""
    zeropp: str = "off"
    """ZeRO-3 runs: the ZeRO++ options that apply to a frozen backbone (adept_ds/run/zeropp.py). hpz: hierarchical
    partitioning. Each weight also keeps a second shard over `hpz_ranks` ranks (a node). A frozen weight's second
    shard never goes stale, so after the first step every gather of the frozen backbone stays inside a node and
    only the trainable units' gathers cross nodes. It costs 1/hpz_ranks of the ZeRO-managed weights per rank and
    changes no loss; it is off on one node (nothing to gain). qwz: gathers weights as int8 with a scale per group
    of ~8k elements (a quarter of fp32's bytes, half of bf16's); lossy, so the forward sees quantized weights
    (the quality cost on the demo is in benchmarks/RESULTS.md). hpz+qwz: both."""
    hpz_ranks: int = 0
    """zeropp=hpz: the ranks of one secondary shard; 0: the ranks of a node (the launcher's local world size)."""
    threads: int = 0
    """Intra-op CPU threads per rank; 0: OMP_NUM_THREADS when set, else this node's cores / its ranks."""
    memory_gb: float = 0
    """Device memory per rank (GiB) that the automatic choices plan against (frozen_weights=auto and ZeRO-3's
    "auto" window); 0: the GPU's memory, or on CPU the machine's RAM / its ranks."""
    peak_tflops: float = 0
    """Dense peak TFLOP/s of one device in the run's precision, which MFU is measured against; 0: NVIDIA's datasheet
    figure for an H100, H200 or A100 (adept_ds/run/flops.py), or on CPU a matmul measured at start-up."""

    def global_batch(self, world_size: int) -> int:
        """Blocks per optimizer step over all ranks: micro batch x accumulation x ranks."""
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size

    def __post_init__(self):
        for name in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "log_interval"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"train.{name}={value!r}: need an int >= 1")
        _check(
            isinstance(self.save_interval, int) and self.save_interval >= 0, f"train.save_interval={self.save_interval!r}: need an int >= 0"
        )
        _check(
            isinstance(self.epochs, (int, float)) and not isinstance(self.epochs, bool) and 0 <= self.epochs < math.inf,
            f"train.epochs={self.epochs!r}: need a number >= 0 (0: train.max_steps)",
        )
        _check(
            isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 0,
            f"train.keep_checkpoints={self.keep_checkpoints!r}: need an int >= 0 (0 keeps every checkpoint)",
        )
        _check(self.nonfinite in NONFINITE_POLICIES, f"train.nonfinite={self.nonfinite!r}: choose one of {', '.join(NONFINITE_POLICIES)}")
        _check(
            isinstance(self.max_skipped_steps, int) and self.max_skipped_steps >= 0,
            f"train.max_skipped_steps={self.max_skipped_steps!r}: need an int >= 0",
        )
        _check(self.gradient_clipping >= 0, f"train.gradient_clipping={self.gradient_clipping!r}: need >= 0 (0 disables)")
        _check(self.timeout_minutes > 0, f"train.timeout_minutes={self.timeout_minutes!r}: need a number of minutes > 0")
        _check(
            self.frozen_weights in FROZEN_WEIGHTS,
            f"train.frozen_weights={self.frozen_weights!r}: choose one of {', '.join(FROZEN_WEIGHTS)}",
        )
        _check(self.zeropp in ZEROPP, f"train.zeropp={self.zeropp!r}: choose one of {', '.join(ZEROPP)}")
        _check(
            isinstance(self.hpz_ranks, int) and self.hpz_ranks >= 0,
            f"train.hpz_ranks={self.hpz_ranks!r}: need an int >= 0 (0 = the ranks of one node)",
        )
        _check(isinstance(self.threads, int) and self.threads >= 0, f"train.threads={self.threads!r}: need an int >= 0 (0 = automatic)")
        _check(
            isinstance(self.memory_gb, (int, float)) and self.memory_gb >= 0,
            f"train.memory_gb={self.memory_gb!r}: need GiB >= 0 (0 = the device's own memory)",
        )
        _check(
            isinstance(self.peak_tflops, (int, float)) and not isinstance(self.peak_tflops, bool) and self.peak_tflops >= 0,
            f"train.peak_tflops={self.peak_tflops!r}: need TFLOP/s >= 0 (0 = the datasheet's, or measured on CPU)",
        )


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 1e-4
    """Base learning rate lr_base; the scheduler shapes it over time, the unit rule scales it per unit."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def __post_init__(self):
        _check(
            isinstance(self.betas, (list, tuple))
            and len(self.betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas),
            f"optimizer.betas={self.betas!r}: need two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
        self.betas = tuple(self.betas)
        _check(
            isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr),
            f"optimizer.lr={self.lr!r}: need a positive number",
        )
        _check(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay!r}: need >= 0")


@dataclass(kw_only=True)
class SchedulerConfig:
    type: str = "WarmupCosineLR"
    """lr_base over time. DeepSpeed's WarmupCosineLR, WarmupLR (warmup, then flat) or WarmupDecayLR (warmup, then linear
    to 0); or adept_ds's (adept_ds/training/lr.py, warmup may be 0): constant (no warmup), linear or cosine (warmup, then down to
    min_lr_ratio), warmup_stable_decay (torchtitan's WSD: warmup, flat, then down over the last decay_ratio of the steps)."""
    warmup_steps: int = 10
    """Warmup steps (DeepSpeed's schedulers need >= 1); replaced by warmup_ratio when that is > 0."""
    warmup_ratio: float = 0.0
    """Warmup as a share of train.max_steps (rounded up), as HF's warmup_ratio; 0: warmup_steps."""
    min_lr_ratio: float = 0.1
    """End LR as a fraction of lr (WarmupCosineLR, linear, cosine, warmup_stable_decay)."""
    decay_ratio: float = 0.1
    """warmup_stable_decay: the share of the steps, at the end, over which the LR decays."""
    decay_type: str = "linear"
    """warmup_stable_decay's decay: linear, sqrt (1 - sqrt(progress)) or cosine."""
    warmup_type: str = "linear"
    """DeepSpeed's schedulers' warmup: linear or log."""

    def __post_init__(self):
        _check(self.type in SCHEDULERS, f"scheduler.type={self.type!r}: choose one of {', '.join(SCHEDULERS)}")
        _check(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, f"scheduler.warmup_steps={self.warmup_steps!r}: need an int >= 0"
        )
        _check(
            isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1,
            f"scheduler.warmup_ratio={self.warmup_ratio!r}: need a number in [0, 1) (0: use warmup_steps)",
        )
        _check(
            self.warmup_steps >= 1 or self.warmup_ratio > 0 or self.type not in DEEPSPEED_SCHEDULERS,
            f"scheduler.warmup_steps=0: DeepSpeed's {self.type} needs at least 1; for no warmup take scheduler.type=constant, linear, "
            "cosine or warmup_stable_decay",
        )
        _check(0 <= self.min_lr_ratio <= 1, f"scheduler.min_lr_ratio={self.min_lr_ratio!r}: need a number in [0, 1]")
        _check(
            isinstance(self.decay_ratio, (int, float)) and 0 < self.decay_ratio <= 1,
            f"scheduler.decay_ratio={self.decay_ratio!r}: need a number in (0, 1]",
        )
        _check(self.decay_type in DECAY_TYPES, f"scheduler.decay_type={self.decay_type!r}: choose one of {', '.join(DECAY_TYPES)}")
        _check(self.warmup_type in ("linear", "log"), f"scheduler.warmup_type={self.warmup_type!r}: choose linear or log")


@dataclass(kw_only=True)
class ImportanceConfig:
    interval: int = 500
    """Recompute unit importance every this many steps (paper: 500); 0 = never (uniform LR)."""
    batches: int = 2
    """General-probe micro-batches per rank per recompute."""
    batch_size: int = 2
    """Blocks per probe micro-batch and rank."""
    mapping: str = "linear"
    """linear: 2 * (1 - I_norm); power: 2 * (1 - I_norm) ** power; uniform: 1 (importance logged only)."""
    power: float = 2.0
    normalize: str = "global"
    """How importance becomes I_norm in [0, 1]: global (min-max over all units, the paper's), per_type (min-max
    within each unit type across the trained layers) or rank (ranks over all units); see adept_ds/training/lr.py."""
    max_tokens: int = 16_777_216
    """Probe batches are drawn from the general corpus's first this many tokens (a raw corpus is tokenised that far)."""

    def __post_init__(self):
        _check(isinstance(self.interval, int) and self.interval >= 0, f"importance.interval={self.interval!r}: need an int >= 0")
        _check(isinstance(self.batches, int) and self.batches >= 1, f"importance.batches={self.batches!r}: need an int >= 1")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"importance.batch_size={self.batch_size!r}: need an int >= 1")
        _check(self.mapping in LR_MAPPINGS, f"importance.mapping={self.mapping!r}: choose one of {', '.join(LR_MAPPINGS)}")
        _check(isinstance(self.power, (int, float)) and self.power > 0, f"importance.power={self.power!r}: need a number > 0 (e.g. 2.0)")
        _check(self.normalize in NORMALIZATIONS, f"importance.normalize={self.normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"importance.max_tokens={self.max_tokens!r}: need an int >= 1")


@dataclass(kw_only=True)
class EvalConfig:
    interval: int = 200
    """Validate on held-out general and domain blocks every this many steps, at step 0 (the guard's reference)
    and at the end; 0 = never. Forward passes only, on every rank, token-weighted over all ranks."""
    max_tokens: int = 0
    """Validation tokens per corpus; 0 = 2 % of the tokens trained per interval (interval x global batch x block),
    at least one block per rank and at most 4M tokens: 2.0-2.3 % of ADEPT's training time on the demo (benchmarks/validation_cost.py)."""

    def __post_init__(self):
        _check(isinstance(self.interval, int) and self.interval >= 0, f"eval.interval={self.interval!r}: need an int >= 0 (0 = never)")
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 0,
            f"eval.max_tokens={self.max_tokens!r}: need an int >= 0 (0 = sized from eval.interval)",
        )


@dataclass(kw_only=True)
class GuardConfig:
    max_general_increase: float = 0.0
    """Forgetting guard: act when the general validation loss rises more than this fraction above its step-0
    value (0.05: 5 %); 0 = off. Needs validation (eval.interval > 0) and a general corpus."""
    action: str = "stop"
    """stop: save a checkpoint and stop; rollback: make the best complete checkpoint the run's newest (newer ones
    move to checkpoints/rolled_back/), export it and stop; cool: multiply every unit's LR by cool_factor and go on."""
    cool_factor: float = 0.5
    """action=cool: each trigger multiplies every unit's learning rate by this (the product persists on resume)."""

    def __post_init__(self):
        _check(
            isinstance(self.max_general_increase, (int, float))
            and 0 <= self.max_general_increase
            and math.isfinite(self.max_general_increase),
            f"guard.max_general_increase={self.max_general_increase!r}: need a fraction >= 0 (0.05 = 5 %; 0 = off)",
        )
        _check(self.action in GUARD_ACTIONS, f"guard.action={self.action!r}: choose one of {', '.join(GUARD_ACTIONS)}")
        _check(
            isinstance(self.cool_factor, (int, float)) and 0 < self.cool_factor < 1,
            f"guard.cool_factor={self.cool_factor!r}: need a number in (0, 1), e.g. 0.5",
        )

    @property
    def enabled(self) -> bool:
        return self.max_general_increase > 0


@dataclass(kw_only=True)
class ReportConfig:
    to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 logs the run's scalars (loss, tokens/s and tokens per source, per-unit LRs and importance,
    validation, the forgetting guard), beside metrics.jsonl: any of tensorboard (output_dir/tensorboard), wandb
    (pip install 'adept_ds[wandb]'; WANDB_MODE=offline for no network) and mlflow (pip install 'adept_ds[mlflow]');
    [] for metrics.jsonl alone."""
    project: str = "adept_ds"
    """The W&B project and the MLflow experiment."""
    run_name: str = ""
    """The W&B and MLflow run name; "": the output_dir's name."""
    mlflow_tracking_uri: str = ""
    """MLflow's tracking server or store; "": $MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns."""

    def __post_init__(self):
        if isinstance(self.to, str):  # report.to=wandb, as HF's report_to takes one name
            self.to = [] if self.to == "none" else [self.to]
        _check(
            isinstance(self.to, list) and all(sink in REPORT_SINKS for sink in self.to),
            f"report.to={self.to!r}: choose any of {', '.join(REPORT_SINKS)} (a list, e.g. [tensorboard, wandb]; [] for none)",
        )


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train (`model.path`) and its attention kernel; `model: DIR` is short for `model.path: DIR`."""
    method: str = "adept"
    """adept: the manifest's copies, unit-wise adaptive LR (selective expansion); pt_full: every parameter of
    the original model, uniform LR; llama_pro: the copies of a uniformly expanded model, uniform LR;
    adept_no_stage1: the k least important original layers (from `probe`), adaptive LR; adept_no_stage2:
    the copies of a selectively expanded model, uniform LR; adept_no_stage2_matched: the same copies, one
    uniform LR equal to the mean of the adaptive scales ADEPT would set, times lr_base(t)."""
    probe: str = ""
    """Probe result (`adept-ds probe`) choosing the layers adept_no_stage1 trains."""
    k: int = 4
    """How many of the probe's least important layers adept_no_stage1 trains."""
    deepspeed: str = "zero3"
    """DeepSpeed JSON config: a path, or the name of one shipped with adept_ds (zero3: ZeRO-3, bf16 on GPU and fp32 on
    CPU; zero3_bf16, zero3_fp16, zero3_offload, zero2, zero1, ...); its "auto" values are filled from this run config."""
    output_dir: str = "runs/train"
    """Where the run writes checkpoints, metrics, TensorBoard logs and the exported model (final/)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        if isinstance(self.model, str):  # RunConfig(model=DIR), as a config file's `model: DIR`
            self.model = ModelConfig(path=self.model)
        self.deepspeed = resolve_path("deepspeed", self.deepspeed, Path.cwd())  # a shipped name, when built directly
        _check(self.method in METHODS, f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        _check(isinstance(self.k, int) and self.k >= 1, f"k={self.k!r}: need an int >= 1")
        if self.guard.enabled:
            _check(
                self.eval.interval > 0,
                f"guard.max_general_increase={self.guard.max_general_increase} needs validation: set eval.interval > 0",
            )
            _check(
                bool(self.data.general_eval or self.data.general),
                "the forgetting guard (guard.max_general_increase > 0) needs general text to validate on: "
                "set data.general_eval or data.general (`adept-ds make-probe-corpus` makes one from the model)",
            )

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def adaptive_lr(self) -> bool:
        return self.spec.adaptive_lr and self.importance.interval > 0

    def validate_paths(self) -> None:
        """Paths must exist before any process group starts."""
        _check(bool(self.model.path), "model is not set: give the expanded model directory (model=DIR)")
        _check(Path(self.model.path).is_dir(), f"model={self.model.path!r} does not exist")
        _check(
            Path(self.deepspeed).is_file(),
            f"deepspeed={self.deepspeed!r}: no such DeepSpeed config file; give a path or a shipped config's name "
            f"({', '.join(shipped_ds_configs())})",
        )
        for source in self.data.domain_sources():
            where = "data.domain" if isinstance(self.data.domain, str) else f"data.domain source '{source.name}'"
            _check(bool(source.path) and Path(source.path).exists(), f"{where}={source.path!r} does not exist")
        for name in ("general_eval", "domain_eval"):
            path = getattr(self.data, name)
            _check(not path or Path(path).exists(), f"data.{name}={path!r} does not exist")
        if self.spec.trains == "probe_layers":
            _check(bool(self.probe) and Path(self.probe).is_file(), f"probe={self.probe!r}: method {self.method} needs a probe result file")
        if self.adaptive_lr:
            _check(
                bool(self.data.general) and Path(self.data.general).exists(),
                f"data.general={self.data.general!r} does not exist (needed for unit importance)",
            )

    def corpora(self) -> dict[str, DataSource]:
        """What a run tokenises: the domain corpus (each source of a mixture), and the general one when unit
        importance is measured."""
        sources = self.data.domain_sources()
        domain = {"domain": sources[0]} if len(sources) == 1 else {f"domain:{s.name}": s for s in sources}
        general = DataSource(name="general", path=self.data.general, weight=0.0, text_field=self.data.text_field)
        return {**domain, **({"general": general} if self.adaptive_lr else {})}

    def block_cache(self) -> Path:
        """Where tokenised blocks are cached (shared by `adept-ds check` and the training run)."""
        from adept_ds.model.demo_model import cache_root

        return Path(self.data.cache_dir) if self.data.cache_dir else cache_root() / "blocks"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def with_run_length(config: RunConfig, domain_blocks: int, world_size: int) -> tuple[RunConfig, list[str]]:
    """train.epochs and scheduler.warmup_ratio resolved into train.max_steps and scheduler.warmup_steps, once the
    corpus's size is known (`domain_blocks`: the blocks training draws from, over all sources); with a line each."""
    train, schedule, notes = config.train, config.scheduler, []
    if train.epochs > 0:
        global_batch = train.global_batch(world_size)
        steps = max(1, math.ceil(train.epochs * domain_blocks / global_batch))
        notes.append(
            f"train.epochs={train.epochs}: train.max_steps = {steps} = ceil({train.epochs} x {domain_blocks} domain blocks / "
            f"global batch {global_batch})" + (f" (train.max_steps={train.max_steps} is not used)" if train.max_steps != steps else "")
        )
        train = dataclasses.replace(train, max_steps=steps)
    if schedule.warmup_ratio > 0:
        warmup = math.ceil(schedule.warmup_ratio * train.max_steps)
        notes.append(
            f"scheduler.warmup_ratio={schedule.warmup_ratio}: scheduler.warmup_steps = {warmup} = ceil(ratio x {train.max_steps} steps)"
        )
        schedule = dataclasses.replace(schedule, warmup_steps=warmup)
    return dataclasses.replace(config, train=train, scheduler=schedule), notes


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'run config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ValueError(f"unknown config key '{prefix}{key}'{hint}")
        kind = fields[key].type
        sub = {section.__name__: section for section in SECTIONS.values()}.get(kind)
        if sub is not None:
            kwargs[key] = _build(sub, value, f"{prefix}{key}.")
        else:
            if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if kind == "str" and isinstance(value, bool):  # YAML 1.1 reads off/on (no/yes) as booleans: train.zeropp=off
                value = "on" if value else "off"
            expected = {"str": str, "int": int, "float": (int, float), "bool": bool}.get(kind)
            if expected is not None and (not isinstance(value, expected) or (kind == "int" and isinstance(value, bool))):
                raise ValueError(f"config key '{prefix}{key}' = {value!r}: expected {kind}")
            kwargs[key] = value
    return cls(**kwargs)


PATH_KEYS = (
    "model.path",
    "probe",
    "deepspeed",
    "output_dir",
    "data.domain",
    "data.general",
    "data.general_eval",
    "data.domain_eval",
    "data.cache_dir",
)
"""The run config's paths: made absolute once, when the config is loaded (`resolve_path`)."""
SHIPPED_DS_CONFIGS = Path(__file__).parent.parent / "ds_configs"  # adept_ds/ds_configs
"""The DeepSpeed configs that ship with the package (ds_configs/ of the repository), named by `deepspeed: zero3`."""


def shipped_ds_configs() -> list[str]:
    return sorted(path.stem for path in SHIPPED_DS_CONFIGS.glob("*.json"))


def resolve_path(key: str, value, base: Path):
    """`value` of path key `key` made absolute against `base` (after ~ and $VARS); "" stays unset.

    `deepspeed` may also name a shipped config: `zero3` (or `ds_configs/zero3.json`, as configs written for a
    checkout name it), when no such file exists under `base`. `data.domain` may be a mixture: each source's path."""
    if key == "data.domain" and isinstance(value, list):
        return [
            {**entry, "path": resolve_path(key, entry["path"], base)}
            if isinstance(entry, dict) and isinstance(entry.get("path"), str)
            else resolve_path(key, entry, base)
            for entry in value
        ]
    if not isinstance(value, str) or not value:
        return value
    path = Path(os.path.expandvars(value)).expanduser()
    # normpath, not resolve(): "../x" reads as the user wrote it, and symlinked directories stay as named
    resolved = Path(os.path.normpath(path if path.is_absolute() else (base / path).absolute()))
    if key == "deepspeed" and not resolved.exists():
        name = path.name.removesuffix(".json")
        if path.parent in (Path("."), Path("ds_configs")) and name in shipped_ds_configs():
            return str(SHIPPED_DS_CONFIGS / f"{name}.json")
    return str(resolved)


def _set(values: dict, key: str, value) -> None:
    node = values
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: '{part}' is not a section")
    node[leaf] = value


def _get(values: dict, key: str):
    node = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def canonical_key(key: str, value=None) -> str:
    """The dotted key an override sets: `model=DIR` sets model.path (a mapping sets the whole section)."""
    return "model.path" if key == "model" and not isinstance(value, dict) else key


def with_model_section(values: dict) -> dict:
    """`values` with a `model: DIR` written as the section it is short for, `model: {path: DIR}`."""
    if isinstance(values.get("model"), str):
        values["model"] = {"path": values["model"]}
    return values


def apply_overrides(values: dict, overrides: list[str], base: Path | None = None) -> dict:
    """`train.max_steps=10` style overrides, values parsed as YAML scalars; with `base`, their paths are resolved
    against it (the current directory, where a shell would complete them)."""
    values = with_model_section(json.loads(json.dumps(values)))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not key=value (e.g. train.max_steps=10)")
        value = yaml.safe_load(raw)
        key = canonical_key(key, value)
        if base is not None and key in PATH_KEYS:
            value = resolve_path(key, value, base)
        try:
            _set(values, key, value)
        except ValueError as err:
            raise ValueError(f"override {override!r}: {err}") from None
    return values


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The run config of a YAML file plus `key=value` overrides, its paths made absolute: those written in the file
    against the file's directory, those given as overrides against the current directory."""
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ValueError(f"run config {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ValueError(f"run config {path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ValueError(f"run config {path} must be a mapping of keys (model:, data:, ...), got {type(values).__name__}")
        with_model_section(values)
        base = Path(path).absolute().parent
        for key in PATH_KEYS:
            value = _get(values, key)
            if value is not None:
                _set(values, key, resolve_path(key, value, base))
    values = apply_overrides(values, list(overrides), Path.cwd())
    for key in PATH_KEYS:  # the defaults (output_dir, deepspeed) too
        if _get(values, key) is None:
            default = _default(key)
            if default:
                _set(values, key, resolve_path(key, default, Path.cwd()))
    return _build(RunConfig, values)


def _default(key: str):
    """The dataclass default of a top-level key (nested path keys default to "")."""
    if "." in key:
        return None
    return next(f.default for f in dataclasses.fields(RunConfig) if f.name == key)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "importance": ImportanceConfig,
    "eval": EvalConfig,
    "guard": GuardConfig,
    "report": ReportConfig,
}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass, read from its source (Python keeps none at run time)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def starter_config(overrides: list[str], directory: Path) -> str:
    """A run config YAML for `adept-ds init`: every key with its value (the default, or the override given) and what
    it does. Paths given relative to the current directory are written relative to `directory`, the file's."""
    import textwrap

    config = load_run_config(None, overrides)  # refuses a bad key or value now, not when the run starts
    given = {}  # each key as the override sets it, and its raw value
    for override in overrides:
        key, _, raw = override.partition("=")
        given[canonical_key(key, yaml.safe_load(raw))] = raw
    values = config.to_dict()
    for key in PATH_KEYS:
        if key not in given:  # unset paths stay as the defaults read (output_dir and deepspeed name no file of yours)
            _set(values, key, _default(key) if "." not in key else _get(values, key))
            continue
        raw = yaml.safe_load(given[key])

        def relative(value, resolved):
            return resolved if not isinstance(value, str) or Path(value).is_absolute() else os.path.relpath(resolved, directory)

        resolved = _get(values, key)
        if isinstance(raw, list):
            entries = [e["path"] if isinstance(e, dict) else e for e in raw]
            resolved = [{**e, "path": relative(r, e["path"])} for r, e in zip(entries, resolved)]
        else:
            resolved = relative(raw, resolved)
        _set(values, key, resolved)
    if isinstance(_get(values, "data.domain"), list):  # the sources as given, without the resolved defaults
        _set(
            values,
            "data.domain",
            [{k: v for k, v in e.items() if k in SOURCE_KEYS} for e in values["data"]["domain"]],
        )

    def comment(text: str, indent: str) -> list[str]:
        return [f"{indent}# {line}" for line in textwrap.wrap(text, 112 - len(indent))]

    def scalar(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").removesuffix("...").strip()

    lines = [
        "# adept_ds run config (written by `adept-ds init`): every key, its value and what it does.",
        "# Relative paths are relative to this file's directory. Validate: adept-ds check --config THIS.yaml [--num-gpus N | --hostfile H]",
        "# Train: adept-ds train THIS.yaml --num-gpus N [key=value ...] (key=value overrides any key below)",
        f"# DeepSpeed configs shipped with adept_ds, by name: {', '.join(shipped_ds_configs())}",
        "",
    ]
    top_docs = field_docs(RunConfig)
    for name, value in values.items():
        if name in SECTIONS:
            docs = field_docs(SECTIONS[name])
            lines.append(f"{name}:")
            for key, sub in value.items():
                lines += comment(docs.get(key, ""), "  ") if docs.get(key) else []
                lines.append(f"  {key}: {scalar(sub)}")
            lines.append("")
        else:
            lines += comment(top_docs.get(name, ""), "") if top_docs.get(name) else []
            lines.append(f"{name}: {scalar(value)}")
            lines.append("")
    return "\n".join(lines)
