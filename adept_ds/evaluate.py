"""Evaluation: perplexity (token-weighted mean loss) on held-out corpora, and exact-match accuracy of
greedy answers to question/answer JSONL (GSM8K-style `#### 42` answers by default).

Launched with several ranks (`deepspeed --num_gpus N -m adept_ds.cli eval ...` or torchrun), each
rank scores its share of the blocks/questions and the sums are all-reduced.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from adept_ds.probe import loss_sum

DEFAULT_ANSWER_PATTERN = r"####\s*(-?[\d,]*\.?\d+)"
DEFAULT_PROMPT = "Question: {question}\nAnswer:"


def _world() -> tuple[int, int, object]:
    """(rank, world_size, sum-reducer): the process group if launched distributed, else a world of one."""
    from adept_ds.distributed import all_reduce_sum, init_distributed, launched_distributed

    if launched_distributed():
        rank, world_size = init_distributed()
        return rank, world_size, all_reduce_sum
    return 0, 1, lambda tensor: tensor


def corpus_loss(model, blocks: torch.Tensor, batch_size: int = 4, rank: int = 0, world_size: int = 1, reduce=lambda t: t) -> float:
    """Mean next-token cross-entropy over all predicted tokens of `blocks` [N, T] (this rank: blocks[rank::world])."""
    sums = torch.zeros(2, dtype=torch.float64)
    mine = blocks[rank::world_size]
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(mine), batch_size), desc="perplexity", disable=rank != 0, leave=False):
            batch = mine[start : start + batch_size].to(model.device)
            sums[0] += loss_sum(model(input_ids=batch, use_cache=False).logits[:, :-1], batch[:, 1:]).item()
            sums[1] += batch[:, 1:].numel()
    sums = reduce(sums)
    return (sums[0] / sums[1]).item()


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> str | None:
    """The first capture of `pattern` in `text`, normalised (thousands separators dropped)."""
    match = re.search(pattern, text)
    return match.group(1).replace(",", "").strip() if match else None


def qa_accuracy(
    model,
    tokenizer,
    rows: list[dict],
    prompt: str = DEFAULT_PROMPT,
    pattern: str = DEFAULT_ANSWER_PATTERN,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    reduce=lambda t: t,
) -> dict:
    """Exact match of the answer extracted from greedy generations against each row's `answer`."""
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    mine = rows[rank::world_size]
    correct, examples = 0, []
    model.eval()
    for start in tqdm(range(0, len(mine), batch_size), desc="accuracy", disable=rank != 0, leave=False):
        chunk = mine[start : start + batch_size]
        inputs = tokenizer([prompt.format(**row) for row in chunk], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, text in zip(chunk, texts):
            predicted = extract_answer(text, pattern)
            expected = str(row["answer"]).replace(",", "").strip()
            correct += predicted == expected
            if len(examples) < 5:
                examples.append({"question": row["question"], "generated": text, "predicted": predicted, "answer": expected})
    totals = reduce(torch.tensor([correct, len(mine)], dtype=torch.float64))
    return {"accuracy": (totals[0] / totals[1]).item(), "correct": int(totals[0]), "total": int(totals[1]), "examples": examples}


def read_qa(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{number}: a QA record needs 'question' and 'answer' fields, got {sorted(row)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"QA file {path} has no records")
    return rows[:limit]


def evaluate_model(
    model_dir: str | Path,
    corpora: dict[str, str | Path] | None = None,
    qa: str | Path | None = None,
    block_size: int = 128,
    max_blocks: int = 64,
    max_questions: int | None = None,
    pattern: str = DEFAULT_ANSWER_PATTERN,
    prompt: str = DEFAULT_PROMPT,
    cache_dir: str | Path | None = None,
) -> dict:
    """{"perplexity": {name: {"loss", "perplexity", "tokens"}}, "qa": {...}} for one checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adept_ds.data import load_blocks
    from adept_ds.demo_model import cache_root
    from adept_ds.distributed import on_cpu

    rank, world_size, reduce = _world()
    device = torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    cache = Path(cache_dir) if cache_dir else cache_root() / "blocks"
    results: dict = {"model": str(model_dir), "perplexity": {}}
    for name, path in (corpora or {}).items():
        store = load_blocks(path, tokenizer, block_size, cache, max_tokens=max_blocks * block_size, vocab_size=model.config.vocab_size)
        blocks = store[: min(len(store), max_blocks)]
        loss = corpus_loss(model, blocks, rank=rank, world_size=world_size, reduce=reduce)
        results["perplexity"][name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(blocks.numel())}
    if qa:
        results["qa"] = qa_accuracy(
            model, tokenizer, read_qa(qa, max_questions), prompt, pattern, rank=rank, world_size=world_size, reduce=reduce
        )
    return results


def run_lm_eval(model_dir: str | Path, tasks: list[str], limit: int | None = None) -> dict:
    """A thin bridge to lm-evaluation-harness (`pip install lm-eval`), which is not a dependency."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError("--lm-eval-tasks needs lm-evaluation-harness: pip install lm-eval") from None
    output = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks, limit=limit)
    return output["results"]
