"""Small corpora written by tests, in every format the data layer reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

_WORDS = (
    "the river city people north summer music light stone garden history water small old green market bridge "
    "king school winter forest bird song road island trade paper clock window mountain harbour festival"
).split()


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 40))).capitalize() + "." for _ in range(count)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path
