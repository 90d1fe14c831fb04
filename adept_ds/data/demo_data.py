"""The demo's domain: generated arithmetic word problems with exact answers.

Deterministic (seeded), so the bundled files can be regenerated and checked. Training text puts
the worked answer after the question ("... Answer: 3 * 4 = 12. #### 12"); the held-out test split
has the same `text` (for domain perplexity) plus `question` and `answer` (for exact-match accuracy).

    python -m adept_ds.data.demo_data OUT_DIR   # writes math_train.jsonl and math_test.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca", "Mei", "Noah", "Omar", "Priya"]
_ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "coins", "cards", "bottles", "tickets"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked solution, answer)."""
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(6)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 12)
    if kind == 0:
        return (
            f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?",
            f"{a} + {b} = {a + b}.",
            a + b,
        )
    if kind == 1:
        a = a + b
        return (
            f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?",
            f"{a} - {b} = {a - b}.",
            a - b,
        )
    if kind == 2:
        return (f"{name} buys {c} boxes with {b} {item} in each box. How many {item} does {name} buy?", f"{c} * {b} = {c * b}.", c * b)
    if kind == 3:
        total = b * c
        return (
            f"{name} shares {total} {item} equally among {c} friends. How many {item} does each friend get?",
            f"{total} / {c} = {b}.",
            b,
        )
    if kind == 4:
        return (
            f"{name} has {a} {item}, buys {c} packs of {b} more, and then gives away {a // 2}. How many {item} are left?",
            f"{a} + {c} * {b} - {a // 2} = {a + c * b - a // 2}.",
            a + c * b - a // 2,
        )
    price = rng.randint(2, 9)
    return (
        f"One of {other}'s {item} costs {price} dollars. {name} buys {c} of them and pays with {price * c + b} dollars. "
        f"How much change does {name} get?",
        f"{price * c + b} - {c} * {price} = {b}.",
        b,
    )


def generate(num_train: int = 4000, num_test: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen, train, test = set(), [], []
    while len(train) + len(test) < num_train + num_test:
        question, solution, answer = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        text = f"Question: {question}\nAnswer: {solution} #### {answer}"
        if len(test) < num_test and len(seen) % 5 == 0:  # held out: never seen in training
            test.append({"question": question, "answer": str(answer), "text": text})
        elif len(train) < num_train:
            train.append({"text": text})
    return train, test


def write_demo_domain(directory: str | Path, **kwargs) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, test = generate(**kwargs)
    paths = directory / "math_train.jsonl", directory / "math_test.jsonl"
    for path, rows in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


if __name__ == "__main__":
    print(write_demo_domain(sys.argv[1] if len(sys.argv) > 1 else "."))
