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

import math

from adept_ds.config import NORMALIZATIONS


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


class ConstantLR:
    """lr_base(t) = lr: the 'constant' scheduler, with DeepSpeed's scheduler interface."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_batch_iteration = -1

    def step(self, last_batch_iteration=None):
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr

    def get_lr(self):
        return list(self.base_lrs)

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state):
        self.last_batch_iteration = state["last_batch_iteration"]


def build_base_scheduler(optimizer, kind: str, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float, warmup_type: str):
    """lr_base(t): one of DeepSpeed's schedulers (or constant) over the optimizer's groups."""
    from deepspeed.runtime import lr_schedules

    if kind == "constant":
        return ConstantLR(optimizer)
    if kind == "WarmupLR":
        return lr_schedules.WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=lr, warmup_num_steps=warmup_steps, warmup_type=warmup_type)
    if kind == "WarmupDecayLR":
        return lr_schedules.WarmupDecayLR(
            optimizer,
            total_num_steps=total_steps,
            warmup_min_lr=0.0,
            warmup_max_lr=lr,
            warmup_num_steps=warmup_steps,
            warmup_type=warmup_type,
        )
    if kind == "WarmupCosineLR":
        return lr_schedules.WarmupCosineLR(
            optimizer,
            total_num_steps=total_steps,
            warmup_min_ratio=0.0,
            warmup_num_steps=warmup_steps,
            cos_min_ratio=min_lr_ratio,
            warmup_type=warmup_type,
        )
    raise ValueError(f"unknown scheduler {kind!r}")


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
