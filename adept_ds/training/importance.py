"""Unit importance on general-domain batches: I_U = (1/|U|) * sum_{j in U} |theta_j| * mean_b |g_bj|.

g_b is the gradient of general probe batch b (the global batch: under data parallelism, ZeRO's
reduction leaves it averaged over ranks). |g| is averaged over probe batches first, then multiplied
elementwise by |theta| (the reference's order). Each rank works on its own partition of every
tensor; one all-reduce of a vector of per-unit sums finishes the job. No full tensor is gathered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adept_ds.model.units import Unit


class AbsGradAccumulator:
    """Running sum of |g| per parameter partition over probe batches."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.num_batches = 0

    def add(self, local_grads: dict[str, torch.Tensor | None]) -> None:
        for name, grad in local_grads.items():
            if grad is None:
                continue
            update = grad.detach().abs().double()
            self.sums[name] = self.sums[name] + update if name in self.sums else update.clone()
        self.num_batches += 1

    def mean(self, name: str) -> torch.Tensor | None:
        return self.sums[name] / self.num_batches if name in self.sums else None


def unit_importance(
    units: list[Unit],
    local_params: dict[str, torch.Tensor],
    accumulator: AbsGradAccumulator,
    numels: dict[str, int],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> list[float]:
    """Mean |theta| * mean|g| per unit, from this rank's partitions of theta and of the |g| sums."""
    sums = torch.zeros(len(units), dtype=torch.float64)
    for index, unit in enumerate(units):
        for name in unit.param_names:
            mean_abs_grad = accumulator.mean(name)
            if mean_abs_grad is not None and mean_abs_grad.numel():
                sums[index] += (local_params[name].detach().double().abs() * mean_abs_grad).sum().cpu()
    sums = all_reduce_sum(sums)
    sizes = torch.tensor([sum(numels[name] for name in unit.param_names) for unit in units], dtype=torch.float64)
    return (sums / sizes).tolist()
