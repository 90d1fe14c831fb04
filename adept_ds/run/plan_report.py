"""What `adept-ds plan` prints: each phase's terms (plan.py), the checkpoint and disk it needs, and the first
change that makes training fit (`suggestions`, which re-plans the changed run as the trainer would lay it out)."""

from __future__ import annotations

from pathlib import Path

from adept_ds.run.config import RunConfig
from adept_ds.run.memory_layout import layout_and_plan
from adept_ds.run.plan import CPU_RUNTIME_BYTES, GIB, GPU_ALLOWANCE, GPU_RESERVE_BYTES, SHOWN_BYTES, TRAINING_PHASES, ModelShape, Plan, _gb


def suggestions(config: RunConfig, shape: ModelShape, plan: Plan, nodes: int, gpus_per_node: int) -> list[str]:
    """The first of these changes that makes training (its steps and importance passes) fit, tried in order of
    cost: activation checkpointing, then with it a smaller micro-batch (same global batch), the optimizer and
    parameters in host memory, more nodes. A plan that fits with checkpointing but would without is told so."""
    import dataclasses

    def peak(train, deepspeed=None, world=None) -> int | None:
        """The training peak (with the reserve) of the changed run, or None when it does not fit."""
        changed = dataclasses.replace(config, train=train, deepspeed=deepspeed or config.deepspeed)
        _, other = layout_and_plan(changed, shape, world or plan.world_size, plan.gpu, plan.device_bytes)
        return max(other.needed(phase) for phase in TRAINING_PHASES if phase in other.phases) if other.fits_training() else None

    def fits(text: str, *args, **kwargs) -> list[str]:
        needed = peak(*args, **kwargs)
        return [] if needed is None else [f"{text} fits ({_gb(needed)} GiB with the reserve)"]

    train = config.train
    if plan.fits_training():
        if train.activation_checkpointing:
            return fits("train.activation_checkpointing=false (faster)", dataclasses.replace(train, activation_checkpointing=False))
        return []
    if train.frozen_weights == "replicated" and (
        tip := fits("train.frozen_weights=sharded", dataclasses.replace(train, frozen_weights="sharded"))
    ):
        return tip
    checkpointed = dataclasses.replace(train, activation_checkpointing=True)
    named = "" if train.activation_checkpointing else "train.activation_checkpointing=true "
    if named and (tip := fits(named.strip(), checkpointed)):
        return tip
    samples = train.micro_batch_size * train.gradient_accumulation_steps
    for micro in range(train.micro_batch_size - 1, 0, -1):
        if samples % micro == 0:
            smaller = dataclasses.replace(checkpointed, micro_batch_size=micro, gradient_accumulation_steps=samples // micro)
            text = f"{named}train.micro_batch_size={micro} train.gradient_accumulation_steps={samples // micro} (same global batch)"
            if tip := fits(text, smaller):
                return tip
    offload = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_offload.json"  # a checkout's, as the tip names it
    if offload.is_file() and (
        tip := fits(f"{named}deepspeed=ds_configs/{offload.name} (optimizer and parameters in host memory)", checkpointed, str(offload))
    ):
        return tip
    for more in range(nodes + 1, 16 * nodes + 1):
        if tip := fits(f"{named}on {more} nodes x {gpus_per_node} GPUs", checkpointed, world=more * gpus_per_node):
            return tip
    return ["nothing tried fits: use GPUs with more memory, a smaller data.block_size, or fewer trainable layers"]


def render(config: RunConfig, shape: ModelShape, plan: Plan, nodes: int, gpus_per_node: int, write_gb_per_s: float) -> str:
    trainable = sum(t.numel for t in shape.trainable())
    total = shape.numel
    device = f"{plan.device_bytes / GIB:.0f} GiB per GPU" if plan.device_bytes else "no memory limit given"
    lines = [
        f"plan: {config.method} on {config.model.path}: {total / 1e9:.2f}B parameters, {trainable / 1e9:.3f}B trainable "
        f"({shape.num_layers} layers; {shape.placement})",
        f"world: {nodes} node(s) x {gpus_per_node} = {plan.world_size} ranks, {device}; micro batch "
        f"{config.train.micro_batch_size} x {config.data.block_size} tokens, activation checkpointing "
        f"{'on' if config.train.activation_checkpointing else 'off'}",
        *[f"note: {note}" for note in plan.notes],
        *(
            [f"reserve: {_gb(GPU_RESERVE_BYTES)} GiB per GPU beyond the allocator's peak: {GPU_ALLOWANCE.describe()} (estimates)"]
            if plan.gpu
            else []
        ),
        "",
    ]
    train = plan.phases["train"].terms
    for phase in plan.phases.values():
        where = "per GPU" if phase.where == "device" and plan.gpu else ("per rank" if phase.where == "device" else "host RAM")
        reserve = GPU_RESERVE_BYTES if plan.gpu else CPU_RUNTIME_BYTES
        verdict = ""
        if phase.where == "device":
            verdict = f" (+{_gb(reserve)} reserve = {_gb(plan.needed(phase.name))} GiB)"
            if plan.device_bytes:
                verdict += ": fits" if plan.fits(phase.name) else ": DOES NOT FIT"
        shown = {term: value for term, value in phase.terms.items() if value >= SHOWN_BYTES}
        if phase.name == "importance":  # the training terms again, at importance.batch_size: show what differs
            shown = {term: value for term, value in shown.items() if train.get(term) != value}
            verdict += f"; the train terms at importance.batch_size={config.importance.batch_size}, and:"
        lines.append(f"{phase.name}: {_gb(phase.total)} GiB {where}{verdict}")
        lines += [f"    {term:<52} {_gb(value):>8} GiB" for term, value in shown.items()]
    seconds = plan.checkpoint_bytes / (write_gb_per_s * 1e9)
    lines += [
        f"checkpoint: {plan.checkpoint_bytes / 1e9:,.2f} GB per save ({plan.checkpoint_files} optimizer files of "
        f"{plan.checkpoint_bytes_per_rank / 1e9:,.3f} GB; frozen weights are not saved), ~{seconds:,.0f} s at "
        f"{write_gb_per_s:g} GB/s",
    ]
    keep = config.train.keep_checkpoints
    if keep:  # the oldest is deleted once the newest is complete: one more is on disk while a save is written
        lines.append(
            f"disk: train.keep_checkpoints={keep}: up to {keep + 1} checkpoints, {(keep + 1) * plan.checkpoint_bytes / 1e9:,.1f} GB"
        )
    else:
        lines.append("disk: train.keep_checkpoints=0 keeps every checkpoint: plan for one per train.save_interval steps")
    tips = suggestions(config, shape, plan, nodes, gpus_per_node)
    lines += [f"suggest: {tip}" for tip in tips]
    return "\n".join(lines)
