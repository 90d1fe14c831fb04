"""General-competence layer probing: the result file format and layer selection.

A probe result is JSON: `{"format": "adept_ds.probe/1", "method": ..., "num_layers": L,
"scores": [one float per original decoder layer], "model_fingerprint": ..., ...}`. Higher score =
more important for general competence; ADEPT expands the k lowest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    if (
        not isinstance(scores, list)
        or not scores
        or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores)
    ):
        raise ValueError(f"probe result {path}: 'scores' must be a non-empty list of finite numbers")
    if result.get("num_layers", len(scores)) != len(scores):
        raise ValueError(f"probe result {path}: num_layers={result['num_layers']} but {len(scores)} scores")
    return result


def least_important_layers(scores: list[float], k: int) -> list[int]:
    """Indices of the k lowest-scoring layers, ascending; ties go to the lower index (stable sort)."""
    if not isinstance(k, int) or not 1 <= k <= len(scores):
        raise ValueError(f"k={k} is out of range: choose between 1 and the number of layers ({len(scores)})")
    ranked = sorted(range(len(scores)), key=lambda layer: scores[layer])
    return sorted(ranked[:k])


def layers_from_probe(path: str | Path, k: int, model_fingerprint: str, num_layers: int) -> list[int]:
    """The k least important layers of a probe result, after checking it was measured on this model."""
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
    return least_important_layers(result["scores"], k)
