"""Choosing k, how many layers to expand, from a probe result (`adept-ds expand --probe FILE --k auto`).

The rule (`choose_k`), on the L scores of a probe result (higher = more important for general competence):

1. threshold = `threshold` (default 0.5) x the median score of all L layers. The median must be positive.
2. A layer is cheap when its score is at most the threshold; k = the number of cheap layers, at least 1.
3. A budget caps k: each copy adds one decoder layer's parameters P (counted from the checkpoint's tensors).
   `budget_params` N allows floor(N / P) copies; `budget_fraction` F allows floor(F x model parameters / P).
   A budget that allows not even one copy is an error. There is no divisibility rule.
4. The layers are the k least important (`probe.least_important_layers`): without a cap, exactly the cheap ones.

Why the median: it is scale-free, and the methods' scores differ by orders of magnitude (mask: loss increases
of ~0.1; grad: sums of |theta * g|; fisher: sums of g^2, all positive) as do models; and it ignores the few
layers that matter enormously (on the demo model layer 0 scores 8.6, 29x the median), which would drag a mean
or stretch a min-max scale. Why half of it: a layer under half the typical layer's importance is one whose
bypass costs general competence little, so its copy can train without disturbing what the model knew. On
the demo probe (30 layers, median 0.296) that is 5 layers, all in the middle of the stack (12, 14, 16-18).
A knee of the sorted scores was the alternative: the sorted demo scores rise smoothly from 0.07 to 0.61 and
only then jump, so the knee sits at ~24 layers (everything but the outliers), not a choice of cheap layers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from adept_ds.model.checkpoint import Checkpoint
from adept_ds.model.families import Family
from adept_ds.probe.layers import least_important_layers

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class KChoice:
    """The chosen k and the numbers behind it."""

    k: int
    layers: list[int]
    """Original 0-based indices to expand, ascending."""
    scores: list[float]
    """Every layer's probe score."""
    threshold: float
    """The absolute threshold: `threshold_factor` x `median`."""
    threshold_factor: float
    median: float
    num_cheap: int
    """Layers scoring at most `threshold` (k before the floor of 1 and the budget)."""
    layer_params: int
    model_params: int
    budget_copies: int | None
    """Copies the budget allows (None: no budget)."""
    budget_text: str | None

    @property
    def capped(self) -> bool:
        return self.budget_copies is not None and self.budget_copies < max(1, self.num_cheap)

    def reason(self) -> str:
        """Why this k, in lines for the terminal."""
        lines = [
            f"auto k = {self.k} of {len(self.scores)} layers: {self.num_cheap} score at most {self.threshold_factor:g} x the median "
            f"{self.median:.4g} = {self.threshold:.4g}"
            + (" (none does: k is at least 1, the least important layer)" if self.num_cheap == 0 else "")
        ]
        if self.budget_copies is not None:
            verdict = f"capped k to {self.k}" if self.capped else "not limiting"
            lines.append(f"budget: {self.budget_text} allows {self.budget_copies} copies of {self.layer_params:,} parameters: {verdict}")
        added = self.k * self.layer_params
        lines.append(f"the copies add {added:,} parameters ({added / self.model_params:.1%} of the model's {self.model_params:,})")
        lines.extend(f"  layer {layer}: score {self.scores[layer]:.4g}" for layer in self.layers)
        return "\n".join(lines)


def choose_k(
    scores: list[float],
    layer_params: int,
    model_params: int,
    budget_params: int | None = None,
    budget_fraction: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> KChoice:
    """k and the layers to expand by the module's rule; at most one of `budget_params` and `budget_fraction`."""
    if not scores:
        raise ValueError("no probe scores: the probe result must score at least one layer")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold {threshold} must be a positive number (a fraction of the median score, default 0.5)")
    if budget_params is not None and budget_fraction is not None:
        raise ValueError("give at most one budget: budget_params or budget_fraction, not both")
    median = statistics.median(scores)
    if not median > 0:
        raise ValueError(
            f"the median probe score is {median:.4g}, not positive: a threshold of {threshold:g} x the median selects nothing "
            "meaningful (most layers cost nothing or help when bypassed); give --k explicitly"
        )
    cutoff = threshold * median
    num_cheap = sum(score <= cutoff for score in scores)
    k, budget_copies, budget_text = max(1, num_cheap), None, None
    if budget_params is not None or budget_fraction is not None:
        if budget_params is not None:
            if budget_params <= 0:
                raise ValueError(f"--budget-params {budget_params} must be a positive number of parameters")
            allowed, budget_text = budget_params, f"--budget-params {budget_params:,}"
        else:
            if not (math.isfinite(budget_fraction) and budget_fraction > 0):
                raise ValueError(f"--budget-fraction {budget_fraction} must be a positive fraction of the model's parameters")
            allowed = math.floor(budget_fraction * model_params)
            budget_text = f"--budget-fraction {budget_fraction:g} ({allowed:,} of the model's {model_params:,} parameters)"
        budget_copies = allowed // layer_params
        if budget_copies < 1:
            raise ValueError(f"{budget_text} allows not even one copy: one decoder layer has {layer_params:,} parameters")
        k = min(k, budget_copies)
    return KChoice(
        k=k,
        layers=least_important_layers(list(scores), k),
        scores=list(scores),
        threshold=cutoff,
        threshold_factor=threshold,
        median=median,
        num_cheap=num_cheap,
        layer_params=layer_params,
        model_params=model_params,
        budget_copies=budget_copies,
        budget_text=budget_text,
    )


def parameter_counts(checkpoint: Checkpoint, family: Family) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters of the model), from the safetensors headers (no weight is read).

    Counted from the tensors rather than the config, so biases (qwen2) and q/k norms (qwen3) are in; a tied
    embedding is stored, and counted, once. Layers of different sizes count as the largest, so a budget holds.
    """
    from safetensors import safe_open

    per_layer: dict[int, int] = {}
    total = 0
    for shard, names in checkpoint.shard_tensors.items():
        with safe_open(str(checkpoint.path / shard), framework="pt") as handle:
            for name in names:
                numel = math.prod(handle.get_slice(name).get_shape())
                total += numel
                split = family.split_layer_key(name)
                if split is not None:
                    per_layer[split[0]] = per_layer.get(split[0], 0) + numel
    if not per_layer:
        raise ValueError(f"{checkpoint.path} holds no decoder-layer tensors ({family.layers_prefix}.N.*)")
    return max(per_layer.values()), total


def plot_choice(result: dict, choice: KChoice, path) -> None:
    """The probe chart with the chosen layers highlighted and the threshold drawn."""
    from adept_ds.probe.layers import plot_probe_result

    capped = f", capped by the budget from {max(1, choice.num_cheap)}" if choice.capped else ""
    title = (
        f"auto k = {choice.k}{capped}: orange layers score <= {choice.threshold_factor:g} x median = {choice.threshold:.3g} "
        f"({result['method']})"
    )
    plot_probe_result(result, path, selected=choice.layers, threshold=choice.threshold, title=title)
