"""A run resolved once, before any process group starts: `resolve_run` turns (run config, world size, device) into
a frozen `ResolvedRun`, which `adept-ds check` prints, `adept-ds plan` renders, and the `Trainer` builds its engine
from (training/engine.py).

Resolving checks everything about a run's inputs that can be checked without a process group; every rank does it
before `init_distributed`, so a bad value fails fast everywhere, and `check` does it on a login node before a job
is queued: config values and paths, the model and its expansion manifest, a probe result's model fingerprint, that
self-replay sources were sampled from the run's base model (data/self_replay.py), the DeepSpeed config (its "auto"
values filled from the run config, its batch arithmetic checked against the world size), the memory layout, and the
data: token stores prepared (one process prepares, the others wait on the filesystem), the held-out split, and the
run's length. A resumed run first keeps its global batches (universal.py). Each error names the bad value and what
would be valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from adept_ds.data.blocks import Packing, load_blocks, usable_blocks
from adept_ds.data.self_replay import base_fingerprint, check_self_generated
from adept_ds.data.token_store import TokenStore
from adept_ds.model.attention import FLASH_ATTENTION, describe_attention, resolve_attention
from adept_ds.model.checkpoint import Checkpoint, fingerprint_checkpoint, open_checkpoint
from adept_ds.model.expand import read_manifest
from adept_ds.model.families import Family, get_family
from adept_ds.probe.layers import layers_from_probe
from adept_ds.run.config import DataSource, RunConfig, with_run_length
from adept_ds.run.ds_config import half_precision, resolve_ds_config
from adept_ds.run.flops import StepFlops, step_flops
from adept_ds.run.memory_layout import MemoryLayout, device_bytes, layout_and_plan
from adept_ds.run.plan import ModelShape, Plan, model_shape
from adept_ds.runtime.distributed import launched_world_size, on_cpu
from adept_ds.runtime.run_log import check_sinks
from adept_ds.training.checkpoints import CHECKPOINT_DIR
from adept_ds.training.universal import keep_global_batch
from adept_ds.training.validation import HeldOut, held_out_sets, validation_blocks

DEVICE_MEMORY = "device"
"""`resolve_run(memory=...)`: plan for train.memory_gb, else this rank's device (device_bytes)."""


@dataclass(frozen=True)
class ResolvedData:
    """The run's corpora as token stores, and which of their blocks train, probe and validate."""

    sources: tuple[DataSource, ...]
    """The training stream's sources (data.domain: one, or a mixture's)."""
    domain: tuple[TokenStore, ...]
    """One store per source."""
    domain_sizes: tuple[int, ...]
    """Blocks training may draw from each source: a held-out tail is not among them."""
    general: TokenStore | None
    """The importance probe's general corpus (runs with adaptive learning rates)."""
    general_blocks: int
    """How many of the general store's first blocks the probe draws (0 without one)."""
    held_out: tuple[HeldOut, ...]
    """The validation sets (none when eval.interval=0)."""

    def stores(self, config: RunConfig) -> dict[str, TokenStore]:
        """Each store by the name `check` reports it under (config.corpora's names)."""
        names = list(config.corpora())
        return dict(zip(names, [*self.domain, *([self.general] if self.general is not None else [])]))


@dataclass(frozen=True)
class ResumeInputs:
    """What the resume decision is made from once the process group exists (universal.resume_tag)."""

    checkpoints: Path
    mode: bool | str
    """False: a new run (refused where checkpoints exist); True: the newest complete one; "auto": it if any."""
    backbone: dict
    """{"backbone_fingerprint", "method"}: what a checkpoint (which holds no frozen weight) must have been trained on."""


@dataclass(frozen=True)
class ResolvedRun:
    config: RunConfig
    """The run as it will run: batch split kept for a resume, length resolved from the corpus."""
    world_size: int
    gpu: bool
    checkpoint: Checkpoint | None
    """The model checkpoint (None when resolved from its config.json alone: `adept-ds plan`)."""
    family: Family
    manifest: dict | None
    """The expansion manifest of an expanded model (methods that train its copies)."""
    trainable_layers: tuple[int, ...] | None
    """The decoder layers whose units train (expanded-model indices); None: every parameter, one unit (pt_full)."""
    ds_config: dict
    """The DeepSpeed config as the engine takes it, every "auto" filled."""
    layout: MemoryLayout
    """Where frozen weights live and how wide ZeRO-3's window is (run/memory_layout.py)."""
    plan: Plan | None
    """The memory plan of that layout (run/plan.py); None under ZeRO stages below 3, which it does not model."""
    shape: ModelShape
    """The trained model's tensors, as the plan and the FLOP count see them."""
    flops: StepFlops
    """A step's floating-point operations as this run makes them (run/flops.py): for MFU and time-to-train."""
    held_out: int
    """Blocks each validation scores, all sets and ranks together (estimated from the config without data)."""
    ds_notes: tuple[str, ...]
    """How the DeepSpeed config's "auto" values were filled and what was dropped (ds_config.py), one line each."""
    notes: tuple[str, ...]
    """What resolving changed in the run config (a resume's batch split, the run's length), one line each."""
    data: ResolvedData | None
    """None when resolved without data (`check --skip-data`, `plan`)."""
    resume: ResumeInputs
    attention: str = ""
    """The attention kernel the model is loaded with (model.attn_implementation resolved: model/attention.py); "" for
    `adept-ds plan`, which loads no model (and may plan a GPU job where flash-attn is not installed)."""
    attention_note: str = ""
    """The run's `attention:` line: the kernel, why, and the document mask."""
    packing: Packing = Packing()
    """How batches meet the model: the document mask, the loss at document starts, one row for flash-attention 2."""
    self_replay: tuple[str, ...] = ()
    """Each self-generated source, verified against its manifest: `name summary` (check_self_replay)."""

    @property
    def unit_names(self) -> list[str]:
        """The trainable units, one optimizer param group each (model/units.py builds them on the model)."""
        if self.trainable_layers is None:
            return ["all"]
        return [f"layer{layer}.{unit}" for layer in self.trainable_layers for unit in self.family.units]

    def for_memory(self, memory: int | None) -> ResolvedRun:
        """This run laid out for `memory` bytes per rank: the trainer's re-plan for the smallest memory of any rank,
        so that every rank takes the same layout on nodes that differ."""
        notes: list[str] = []
        layout, ds_config, plan = memory_layout(self.config, self.shape, self.world_size, self.gpu, self.checkpoint.config, memory, notes)
        return dataclasses.replace(self, layout=layout, ds_config=ds_config, plan=plan, ds_notes=tuple(notes))


def resolve_run(
    config: RunConfig,
    world_size: int | None = None,
    gpu: bool | None = None,
    *,
    resume: bool | str = False,
    memory: int | None | str = DEVICE_MEMORY,
    data: bool = True,
    show_progress: bool = True,
) -> ResolvedRun:
    """`config` resolved for `world_size` ranks (default: the launcher's) on GPUs or CPUs (default: this process's).

    `resume`: as the trainer's (the batch split of a resumed run is kept); `memory`: bytes per rank the layout is
    planned for (None: unknown); `data`: prepare the token stores and resolve the held-out split and run length."""
    world_size = launched_world_size() if world_size is None else world_size
    gpu = not on_cpu() if gpu is None else gpu
    notes = []
    if resume:  # the run's global batches continue at any world size (universal.py)
        config, kept = keep_global_batch(config, world_size, Path(config.output_dir) / CHECKPOINT_DIR)
        notes += [f"resume on {world_size} ranks: {note}" for note in kept]
    config.validate_paths()
    check_sinks(config.report.to)
    checkpoint = open_checkpoint(config.model.path)
    family = get_family(checkpoint.config.get("model_type"))
    num_layers = checkpoint.config["num_hidden_layers"]
    manifest = read_manifest(config.model.path) if config.spec.expanded else None
    if manifest and manifest["num_layers"] != num_layers:
        raise ValueError(
            f"{config.model.path}: its expansion manifest describes {manifest['num_layers']} layers but the model has {num_layers}; "
            "the manifest belongs to another model: re-run `adept-ds expand`"
        )
    fingerprint = fingerprint_checkpoint(checkpoint)
    self_replay = check_self_replay(config, fingerprint)
    trainable_layers = None
    if config.spec.trains == "copies":
        trainable_layers = tuple(manifest["copied_layers"])
    elif config.spec.trains == "probe_layers":
        trainable_layers = tuple(layers_from_probe(config.probe, config.k, fingerprint, num_layers))
    check_positions(config, checkpoint.config)
    ds_notes = []
    memory = device_bytes(config, gpu) if memory == DEVICE_MEMORY else memory
    shape = model_shape(config)
    layout, ds_config, plan = memory_layout(config, shape, world_size, gpu, checkpoint.config, memory, ds_notes)
    attention, attention_note, packing = attention_and_packing(config, gpu, ds_config)
    resolved_data = None
    if data:
        resolved_data, config, length_notes = resolve_data(config, world_size, checkpoint.config.get("vocab_size"), show_progress, packing)
        notes += length_notes
    held_out = sum(held.count for held in resolved_data.held_out) if data else held_out_samples(config, world_size)
    return ResolvedRun(
        config=config,
        world_size=world_size,
        gpu=gpu,
        checkpoint=checkpoint,
        family=family,
        manifest=manifest,
        trainable_layers=trainable_layers,
        ds_config=ds_config,
        layout=layout,
        plan=plan,
        shape=shape,
        flops=run_flops(config, shape, world_size, held_out),
        held_out=held_out,
        ds_notes=tuple(ds_notes),
        notes=tuple(notes),
        data=resolved_data,
        resume=ResumeInputs(
            Path(config.output_dir) / CHECKPOINT_DIR, resume, {"backbone_fingerprint": fingerprint, "method": config.method}
        ),
        attention=attention,
        attention_note=attention_note,
        packing=packing,
        self_replay=self_replay,
    )


def attention_and_packing(config: RunConfig, gpu: bool, ds_config: dict) -> tuple[str, str, Packing]:
    """(the attention kernel, the run's `attention:` line, how batches meet the model); a kernel that cannot run here
    is refused (model/attention.py)."""
    kernel, why = resolve_attention(config.model.attn_implementation, gpu, half_precision(ds_config))
    settings = config.data
    one_row = settings.document_mask and kernel == FLASH_ATTENTION  # its varlen path: only for a batch of one row
    packing = Packing(settings.document_mask, settings.loss_on_document_start, one_row)
    return kernel, describe_attention(kernel, why, settings.document_mask), packing


def resolve_plan(config: RunConfig, world_size: int, gpu: bool, memory: int | None, k: int | None = None) -> ResolvedRun:
    """The run as `adept-ds plan` sees it, from the model's config.json alone (no weights, no data): the shape of
    the model it trains (with `k` copies planned for a model not yet expanded), its layout and memory plan."""
    shape = model_shape(config, k)
    layout, plan = layout_and_plan(config, shape, world_size, gpu, memory)
    ds_config = resolve_ds_config(config.deepspeed, config, world_size, gpu, shape.config, layout.wide_window)
    held_out = held_out_samples(config, world_size)
    return ResolvedRun(
        config=config,
        world_size=world_size,
        gpu=gpu,
        checkpoint=None,
        family=get_family(shape.config.get("model_type")),
        manifest=None,
        trainable_layers=None if shape.trains_everything else shape.trainable_layers,
        ds_config=ds_config,
        layout=layout,
        plan=plan,
        shape=shape,
        flops=run_flops(config, shape, world_size, held_out),
        held_out=held_out,
        ds_notes=(),
        notes=(),
        data=None,
        resume=ResumeInputs(Path(config.output_dir) / CHECKPOINT_DIR, False, {}),
    )


def resolve_data(config: RunConfig, world_size: int, vocab_size: int | None, show_progress: bool, packing: Packing):
    """(ResolvedData, the config with its length resolved, a line per length setting resolved).

    A raw corpus is prepared once (one process prepares, the others wait on the filesystem), so no collective
    waits through tokenisation; stores are memory-mapped: a batch reads only its own blocks. Where `packing` needs
    document boundaries, a store without them (format 1) is refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    cache, settings, documents = config.block_cache(), config.data, packing.setting()

    def store(path, max_tokens=None, text_field=settings.text_field):
        return load_blocks(
            path,
            tokenizer,
            settings.block_size,
            cache,
            text_field,
            max_tokens,
            vocab_size,
            show_progress=show_progress,
            documents=documents,
        )

    sources = settings.domain_sources()
    domain = [store(source.path, text_field=source.text_field) for source in sources]
    general, general_blocks = None, 0
    if config.adaptive_lr:
        general = store(settings.general, config.importance.max_tokens)
        general_blocks = usable_blocks(general, config.importance.max_tokens)
    held_out, domain_sizes, probe_limit = held_out_sets(config, world_size, domain, general, store)
    if probe_limit is not None:
        general_blocks = min(general_blocks, probe_limit)
    check_corpus_size("domain", settings.domain, sum(domain_sizes), config, world_size)
    config, length_notes = with_run_length(config, sum(domain_sizes), world_size)  # train.epochs, scheduler.warmup_ratio
    resolved = ResolvedData(tuple(sources), tuple(domain), tuple(domain_sizes), general, general_blocks, tuple(held_out))
    return resolved, config, length_notes


def check_self_replay(config: RunConfig, model_fingerprint: str | None = None) -> tuple[str, ...]:
    """`name summary` for each `self_generated: true` source, after checking its manifest names the run's base model
    (the expanded model's source): a JSON read per source, so `adept-ds train` runs it before launching any rank.
    `model_fingerprint`: the run model's, when the caller has it (not read again)."""
    replayed = {name: source for name, source in config.corpora().items() if source.self_generated}
    if not replayed:
        return ()
    base, lines = base_fingerprint(config.model.path, model_fingerprint), []
    for name, source in replayed.items():
        try:
            lines.append(f"{name} {check_self_generated(source.path, base)}")
        except ValueError as err:
            raise ValueError(f"data.domain source '{source.name}': {err}") from None
    return tuple(lines)


def check_positions(config: RunConfig, model_config: dict) -> None:
    """data.block_size within the model's positions, unless its config scales RoPE to reach further."""
    positions = model_config.get("max_position_embeddings")
    if positions and config.data.block_size > positions and not model_config.get("rope_scaling"):
        raise ValueError(
            f"data.block_size={config.data.block_size} is longer than {config.model.path}'s max_position_embeddings={positions} "
            f"(and its config has no rope_scaling): give data.block_size <= {positions}"
        )


def memory_layout(config: RunConfig, shape: ModelShape, world_size: int, gpu: bool, model_config: dict, memory: int | None, notes: list):
    """(MemoryLayout, the resolved DeepSpeed config, the layout's memory Plan) for `memory` bytes per rank
    (memory_layout.py chooses; no plan under ZeRO stages below 3); `notes` receives how the final config's "auto"
    values were filled."""
    filled = []
    ds_config = resolve_ds_config(config.deepspeed, config, world_size, gpu, model_config, notes=filled)
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        notes.extend(filled)
        return MemoryLayout("replicated", False, "ZeRO stage < 3 keeps every weight whole on every rank"), ds_config, None
    layout, plan = layout_and_plan(config, shape, world_size, gpu, memory)
    return layout, resolve_ds_config(config.deepspeed, config, world_size, gpu, model_config, layout.wide_window, notes), plan


def held_out_samples(config: RunConfig, world_size: int) -> int:
    """Blocks one validation scores, before the corpora are read: validation_blocks per held-out set (the general
    one when there is a general corpus, and the domain's)."""
    if not config.eval.interval:
        return 0
    sets = 1 + bool(config.data.general_eval or config.data.general)
    return sets * validation_blocks(config, world_size)


def run_flops(config: RunConfig, shape: ModelShape, world_size: int, held_out: int) -> StepFlops:
    """A step's FLOPs as the trainer makes them: its global batch, and its importance passes (adaptive LR) and
    validations (`held_out` blocks each) amortised over their intervals."""
    importance = config.importance
    return step_flops(
        shape,
        config.data.block_size,
        config.train.global_batch(world_size),
        config.train.activation_checkpointing,
        importance_samples=importance.batches * importance.batch_size * world_size if config.adaptive_lr else 0,
        importance_interval=importance.interval,
        validation_samples=held_out,
        eval_interval=config.eval.interval,
    )


def check_corpus_size(name: str, path: str, num_blocks: int, config: RunConfig, world_size: int) -> None:
    """A corpus must fill at least one global batch (micro batch x accumulation x ranks)."""
    train = config.train
    global_batch = train.global_batch(world_size)
    if num_blocks < global_batch:
        raise ValueError(
            f"{name} corpus {path} has {num_blocks} blocks of {config.data.block_size} tokens, fewer than one global batch "
            f"({global_batch} = micro {train.micro_batch_size} x accumulation {train.gradient_accumulation_steps} x {world_size} ranks); "
            "add data or lower train.micro_batch_size / data.block_size"
        )
