"""Evaluation: perplexity (token-weighted mean loss) on held-out corpora, and exact-match accuracy of
greedy answers to question/answer JSONL (GSM8K-style `#### 42` answers by default).

Runs on the device the launcher gives, in `dtype` (`auto`: the model's own on GPU, fp32 on CPU).
Launched with several ranks (`deepspeed --num_gpus N -m adept_ds.cli eval ...` or torchrun), the model
is partitioned by ZeRO-3 (no rank holds it whole, so one larger than a device fits), each rank scores
its share of the blocks/questions and the sums are all-reduced.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from adept_ds.data.blocks import Batch, Packing
from adept_ds.probe.layers import probe_dtype
from adept_ds.probe.runtime import loss_sum
from adept_ds.runtime.distributed import on_cpu

DEFAULT_ANSWER_PATTERN = r"####\s*(-?[\d,]*\.?\d+)"
DEFAULT_PROMPT = "Question: {question}\nAnswer:"


def _world() -> tuple[int, int, object]:
    """(rank, world_size, sum-reducer): the process group if launched distributed, else a world of one."""
    from adept_ds.runtime.distributed import all_reduce_sum, init_distributed, launched_distributed

    if launched_distributed():
        rank, world_size = init_distributed()
        return rank, world_size, all_reduce_sum
    return 0, 1, lambda tensor: tensor


def corpus_loss(model, blocks: Batch | torch.Tensor, batch_size: int = 4, rank: int = 0, world_size: int = 1, reduce=lambda t: t) -> float:
    """Mean next-token cross-entropy over all predicted tokens of `blocks` [N, T] (this rank: blocks[rank::world]): a
    `Batch` (with position ids under the document mask, labels dropped where it says), or a plain tensor of blocks."""
    blocks = Batch.of(blocks)
    sums = torch.zeros(2, dtype=torch.float64)
    mine = blocks[rank::world_size]
    model.eval()
    with torch.no_grad():
        # Every rank runs as many forwards as the rank with most blocks: under ZeRO-3 each forward gathers
        # the weights collectively, so a rank out of blocks runs an uncounted one.
        per_rank = math.ceil(len(blocks) / world_size)
        for start in tqdm(range(0, per_rank, batch_size), desc="perplexity", disable=rank != 0, leave=False):
            batch = mine[start : start + batch_size].to(model.device)
            if not len(batch):
                model(**blocks[:1].to(model.device).model_inputs(labels=False), use_cache=False)
                continue
            logits = model(**batch.model_inputs(labels=False), use_cache=False).logits
            sums[0] += loss_sum(logits[:, :-1], batch.targets).item()
            sums[1] += batch.predicted
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
    # Under ZeRO-3 every forward is collective: all ranks make the same generate calls (dummy rows, never
    # counted, fill the shorter shards) and generate in lock-step until every rank is done (synced_gpus).
    padded = mine + rows[:1] * (math.ceil(len(rows) / world_size) - len(mine))
    correct, examples = 0, []
    model.eval()
    for start in tqdm(range(0, len(padded), batch_size), desc="accuracy", disable=rank != 0, leave=False):
        chunk = padded[start : start + batch_size]
        inputs = tokenizer([prompt.format(**row) for row in chunk], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=world_size > 1,
            )
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, text in zip(mine[start : start + batch_size], texts):  # the real rows come first
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
    dtype: str = "auto",
    packing: Packing = Packing(),
) -> dict:
    """{"model", "dtype", "perplexity": {name: {"loss", "perplexity", "tokens"}}, "qa": {...}} for one checkpoint.

    In `dtype`: `float32`, `bfloat16`, or `auto`: the checkpoint's own on GPU (TF32 matmuls allowed), fp32
    on CPU, where bf16 matmuls are slow and inexact (the probe's rule, `probe_dtype`). On several ranks
    the model is loaded into ZeRO-3 partitions; alone, it is loaded whole onto this process's device. `packing`: the
    document mask and the loss at document starts, as training's data.document_mask and data.loss_on_document_start.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adept_ds.data.blocks import load_blocks, store_batch
    from adept_ds.model.checkpoint import open_checkpoint
    from adept_ds.model.demo_model import cache_root
    from adept_ds.runtime.distributed import zero3_engine

    rank, world_size, reduce = _world()
    torch_dtype = probe_dtype(dtype, open_checkpoint(model_dir).config, on_cpu())
    if dtype == "auto" and not on_cpu():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if world_size > 1:
        engine = zero3_engine(model_dir, torch_dtype, {"train_micro_batch_size_per_gpu": 1})
        model = engine.module
    else:
        device = torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    cache = Path(cache_dir) if cache_dir else cache_root() / "blocks"
    results: dict = {"model": str(model_dir), "dtype": str(model.dtype).removeprefix("torch."), "world_size": world_size, "perplexity": {}}
    results.update(document_mask=packing.document_mask, loss_on_document_start=packing.loss_on_document_start)
    for name, path in (corpora or {}).items():
        vocab_size, documents = model.config.vocab_size, packing.setting()
        store = load_blocks(
            path, tokenizer, block_size, cache, max_tokens=max_blocks * block_size, vocab_size=vocab_size, documents=documents
        )
        blocks = store_batch(store, range(min(len(store), max_blocks)), packing)
        loss = corpus_loss(model, blocks, rank=rank, world_size=world_size, reduce=reduce)
        results["perplexity"][name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(blocks.input_ids.numel())}
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
