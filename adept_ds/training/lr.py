"""The unit-wise learning-rate rule, composed with DeepSpeed's schedulers.

lr_U(t) = scale_U * lr_base(t), scale_U = mapping(Î_U), where Î in [0, 1] is the unit's normalised
importance (1 = most important) and the mapping is
- linear (the paper's rule): 2 * (1 - Î);  power: 2 * (1 - Î) ** p;  uniform: 1 (importance only logged).
The normalisation (`importance.normalize`):
- global (the paper's): Î = (I - min I) / (max I - min I) over all units;
- per_type: the same min-max, but within each unit type across the trained layers (every q_proj
  together, every input_layernorm together, ...): norm weights (~1) and projection weights (~0.02)
  differ by orders of magnitude in mean |theta * g|, which under `global` leaves every projection at
  Î ~ 0 (scale ~ 2) and spreads only the norms;
- rank: Î = (rank of I - 1) / (n - 1), ties sharing their mean rank: the units spread evenly over
  [0, 1] whatever the gaps between them, so a few outliers cannot squash the rest.
A group whose importances are all equal (a type under per_type, or every unit) gets Î = 1/2; when
every unit's importance is equal (as right after expansion, where the zero output projections make
every gradient zero) every scale is 1, whatever the mapping.

DeepSpeed's schedulers rewrite every group's lr from scratch on each step, so a scale written once
would be lost at the next step: `ScaledScheduler` wraps the scheduler and re-applies the scales after
every step.
"""

from __future__ import annotations

import functools
import math

from adept_ds.run.config import DEEPSPEED_SCHEDULERS, NORMALIZATIONS, SCHEDULERS


def unit_type(unit_name: str) -> str:
    """`layer13.self_attn.q_proj` -> `self_attn.q_proj`: what the unit is, whichever layer holds it."""
    return unit_name.split(".", 1)[1] if "." in unit_name else unit_name


def _min_max(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [0.5] * len(values) if high == low else [(value - low) / (high - low) for value in values]


def _ranks(values: list[float]) -> list[float]:
    """(rank - 1) / (n - 1) with ties at their mean rank; 1/2 for a single unit."""
    if len(values) == 1:
        return [0.5]
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 / (len(values) - 1)
        start = end + 1
    return ranks


def normalised_importance(importance: list[float], normalize: str = "global", names: list[str] | None = None) -> list[float]:
    """Î per unit, in [0, 1]; `names` (the units' names) give the unit types for per_type."""
    if normalize == "global":
        return _min_max(importance)
    if normalize == "rank":
        return _ranks(importance)
    if normalize == "per_type":
        if names is None or len(names) != len(importance):
            raise ValueError("per_type normalisation needs one unit name per importance value")
        normalised = [0.0] * len(importance)
        for kind in dict.fromkeys(unit_type(name) for name in names):
            members = [index for index, name in enumerate(names) if unit_type(name) == kind]
            for index, value in zip(members, _min_max([importance[i] for i in members])):
                normalised[index] = value
        return normalised
    raise ValueError(f"unknown importance normalisation {normalize!r}: choose {', '.join(NORMALIZATIONS)}")


def lr_scales(
    importance: list[float], mapping: str = "linear", power: float = 2.0, normalize: str = "global", names: list[str] | None = None
) -> list[float]:
    """Per-unit LR multipliers from per-unit importance; non-finite importance is refused."""
    if mapping == "uniform":
        return [1.0] * len(importance)
    if not importance or not all(math.isfinite(value) for value in importance):
        raise ValueError(f"importance must be finite numbers, got {importance}")
    if min(importance) == max(importance):
        return [1.0] * len(importance)
    normalised = normalised_importance(importance, normalize, names)
    if mapping == "linear":
        return [2.0 * (1.0 - value) for value in normalised]
    if mapping == "power":
        return [2.0 * (1.0 - value) ** power for value in normalised]
    raise ValueError(f"unknown LR mapping {mapping!r}: choose linear, power or uniform")


OWN_SCHEDULERS = tuple(kind for kind in SCHEDULERS if kind not in DEEPSPEED_SCHEDULERS)
"""lr_base(t) shapes adept_ds computes itself (HF's and torchtitan's names; warmup may be 0), beside DeepSpeed's."""


def schedule_factor(kind: str, step: int, warmup: int, total: int, min_ratio: float, decay_ratio: float, decay_type: str) -> float:
    """lr_base at scheduler step `step` (0 before the first optimizer step) as a fraction of optimizer.lr.

    constant: 1 (no warmup, as HF's). The others warm up linearly to 1 over `warmup` steps as torchtitan does,
    (step + 1) / (warmup + 1), so the first step does not run at 0. linear / cosine: then decay to `min_ratio`
    at `total`. warmup_stable_decay (torchtitan's WSD): then flat, then decay to `min_ratio` over the last
    `decay_ratio` of the steps, by `decay_type` (linear, sqrt: 1 - sqrt(progress), or cosine)."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "warmup_stable_decay":
        decay_steps = max(1, round(decay_ratio * total))
        start = max(warmup, total - decay_steps)
        if step < start:
            return 1.0
        progress, curve = (step - start) / max(1, total - start), decay_type
    else:
        progress, curve = (step - warmup) / max(1, total - warmup), kind
    progress = min(progress, 1.0)
    remaining = {"linear": 1.0 - progress, "sqrt": 1.0 - math.sqrt(progress), "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[curve]
    return min_ratio + (1.0 - min_ratio) * remaining


class Schedule:
    """lr_base(t) = each group's initial lr x factor(t), with DeepSpeed's scheduler interface (step, get_lr, state):
    the schedules of OWN_SCHEDULERS. Home-made because DeepSpeed has no WSD, no constant, and refuses a warmup of 0."""

    def __init__(self, optimizer, factor):
        self.optimizer = optimizer
        self.factor = factor
        self.initial_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_batch_iteration = -1
        self.step()

    def step(self, last_batch_iteration=None):
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        for group, lr in zip(self.optimizer.param_groups, self.initial_lrs):
            group["lr"] = lr * self.factor(self.last_batch_iteration)

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state):
        self.step(state["last_batch_iteration"])


def build_base_scheduler(optimizer, sched, lr: float, total_steps: int):
    """lr_base(t): one of OWN_SCHEDULERS, or one of DeepSpeed's, over the optimizer's groups (`sched`: SchedulerConfig)."""
    from deepspeed.runtime import lr_schedules

    warmup = sched.warmup_steps
    if sched.type in OWN_SCHEDULERS:
        factor = functools.partial(
            schedule_factor,
            sched.type,
            warmup=warmup,
            total=total_steps,
            min_ratio=sched.min_lr_ratio,
            decay_ratio=sched.decay_ratio,
            decay_type=sched.decay_type,
        )
        return Schedule(optimizer, factor)
    if sched.type == "WarmupLR":
        return lr_schedules.WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=lr, warmup_num_steps=warmup, warmup_type=sched.warmup_type)
    if sched.type == "WarmupDecayLR":
        return lr_schedules.WarmupDecayLR(
            optimizer,
            total_num_steps=total_steps,
            warmup_min_lr=0.0,
            warmup_max_lr=lr,
            warmup_num_steps=warmup,
            warmup_type=sched.warmup_type,
        )
    if sched.type == "WarmupCosineLR":
        return lr_schedules.WarmupCosineLR(
            optimizer,
            total_num_steps=total_steps,
            warmup_min_ratio=0.0,
            warmup_num_steps=warmup,
            cos_min_ratio=sched.min_lr_ratio,
            warmup_type=sched.warmup_type,
        )
    raise ValueError(f"unknown scheduler {sched.type!r}")


class ScaledScheduler:
    """Wraps a scheduler: after each of its steps, group i's lr := scale_i * (the lr it just set).

    Its state (the wrapped scheduler's plus the scales) is what DeepSpeed checkpoints as the
    lr_scheduler, so a resumed run continues with the same scales.
    """

    def __init__(self, base, num_groups: int):
        self.base = base
        self.optimizer = base.optimizer
        self.scales = [1.0] * num_groups
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        for group, base_lr, scale in zip(self.optimizer.param_groups, self.base_lrs, self.scales):
            group["lr"] = base_lr * scale

    def set_scales(self, scales: list[float]) -> None:
        if len(scales) != len(self.scales):
            raise ValueError(f"{len(scales)} scales for {len(self.scales)} param groups")
        self.scales = [float(s) for s in scales]
        self._apply()

    def step(self, last_batch_iteration=None) -> None:
        self.base.step(last_batch_iteration)
        # The base scheduler has just written lr_base(t) into every group: remember it, then scale.
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._apply()

    def base_lr(self) -> float:
        return self.base_lrs[0]

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "scales": list(self.scales), "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.scales = list(state["scales"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()
