"""A general probe corpus sampled from the base model itself (`adept-ds make-probe-corpus`).

Stage 1a needs general text to find the layers general competence rests on; a user who has only domain
data can let the model write it: what the model produces unprompted is, by construction, what it is good
at. The result is JSONL (`{"text": ...}` per line, UTF-8) for `data.general` or `adept-ds probe --data`.

- Each document starts from the tokenizer's BOS token alone (its EOS where it has no BOS), never from a
  chat template: a prompt would steer the samples toward one kind of text. For an instruct model whose
  BOS is a chat-turn marker (the demo model's `<|im_start|>`) that is what the samples continue.
- Sampling: `temperature`, nucleus `top_p`, no top-k, none of the model's own generation settings; a
  document ends at EOS or after `max_new_tokens`. Whitespace-only documents are dropped.
- Documents are kept in batch order until their generated tokens reach `num_tokens` (the rest of that
  batch is dropped), so the file holds N tokens plus less than one document.
- Deterministic: batch b is sampled after seeding torch from (seed, b), so the output depends on the
  seed, the batch size, `max_new_tokens`, the dtype and the device's numerics, not on how many ranks made it.
- Under a launcher (`deepspeed --module adept_ds.cli make-probe-corpus ...`, torchrun) every rank loads the
  whole model (no ZeRO-3: a model that does not fit one device is out of scope here) and samples batches
  rank, rank + W, ...; each round the documents are all-gathered, so every rank knows when N is reached,
  and rank 0 writes the file in batch order.
- Provenance: once the file is complete, rank 0 writes `FILE.manifest.json` beside it (data/self_replay.py: the model,
  its fingerprint, the settings), so a run can replay the text as self-generated and prove which model wrote it.
  Both are written atomically (temp file + os.replace); an old manifest is removed before the new file replaces the
  old one, so a corpus never sits beside a manifest that is not its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit torch seed for one batch, mixed from (seed, batch index) so nearby pairs are unrelated."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def start_token(tokenizer) -> int:
    """The token every document starts from: BOS, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start documents from")
    return token


def sample_batch(model, tokenizer, generation_config, start: int, batch_size: int, seed: int) -> list[tuple[str, int]]:
    """(text, generated tokens before EOS) for each of `batch_size` documents sampled from `start`."""
    torch.manual_seed(seed)  # generate() samples from torch's global generator (and CUDA's, seeded too)
    prompt = torch.full((batch_size, 1), start, dtype=torch.long, device=model.device)
    with torch.no_grad():
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=generation_config)
    stops = torch.tensor(generation_config.eos_token_id or [], dtype=torch.long, device=output.device)
    documents = []
    for row in output[:, 1:]:
        ended = torch.isin(row, stops).nonzero()
        tokens = row[: ended[0, 0]] if len(ended) else row  # a finished row is padded after its EOS
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        documents.append((text, len(tokens)))
    return documents


def make_probe_corpus(
    model_dir: str | Path,
    output: str | Path,
    num_tokens: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    dtype: str = "auto",
    show_progress: bool = True,
) -> dict:
    """Sample documents from the model in `model_dir` until they hold `num_tokens` tokens; write them to `output`.

    Rank 0 writes `output`, then its provenance manifest `output.manifest.json` (data/self_replay.py).
    Returns {"tokens", "documents", "sampled_tokens", "seconds", "tokens_per_second", "world_size", ...};
    the tokens are those of the kept documents, the rate counts every sampled token on every rank.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from adept_ds.data.self_replay import manifest_path, sampling_settings, write_manifest
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.probe.layers import probe_dtype
    from adept_ds.runtime.distributed import launched_distributed, on_cpu

    for name, value, valid in (
        ("--tokens", num_tokens, num_tokens >= 1),
        ("--batch-size", batch_size, batch_size >= 1),
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1),
        ("--temperature", temperature, temperature > 0),
        ("--top-p", top_p, 0 < top_p <= 1),
    ):
        if not valid:
            valid_range = {"--temperature": "> 0", "--top-p": "in (0, 1]"}.get(name, ">= 1")
            raise ValueError(f"{name} {value} is out of range: it must be {valid_range}")
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output {output} is a directory; give a file path such as general_probe.jsonl")
    checkpoint = open_checkpoint(model_dir)
    cpu = on_cpu()
    torch_dtype = probe_dtype(dtype, checkpoint.config, cpu)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = start_token(tokenizer)

    distributed = launched_distributed()
    if distributed:
        from adept_ds.runtime.distributed import all_gather_objects, init_distributed

        rank, world_size = init_distributed()
    else:
        rank, world_size = 0, 1
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    # A document ends at any token the model ends text with: the tokenizer's EOS and the generation config's.
    configured = model.generation_config.eos_token_id
    stops = sorted({tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None})
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,  # off: transformers' default of 50 would cut the tail top-p keeps
        max_new_tokens=max_new_tokens,
        eos_token_id=stops or None,
        pad_token_id=next(t for t in (tokenizer.pad_token_id, *stops, start) if t is not None),
    )

    started = time.time()
    documents: list[str] = []
    kept_tokens = sampled_tokens = 0
    progress = tqdm(total=num_tokens, desc="sampling", unit="token", disable=not show_progress or rank != 0)
    round_index = 0
    while kept_tokens < num_tokens:
        batch_index = round_index * world_size + rank
        mine = sample_batch(model, tokenizer, generation_config, start, batch_size, batch_seed(seed, batch_index))
        batches = all_gather_objects(mine) if distributed else [mine]  # rank order = batch order
        round_tokens = sum(count for batch in batches for text, count in batch if text.strip())
        if round_tokens == 0:
            raise ValueError(
                f"{model_dir} sampled {world_size * batch_size} empty documents in a row (EOS or special tokens only): "
                "it cannot write a probe corpus; raise --temperature or probe on real general text"
            )
        sampled_tokens += sum(count for batch in batches for _, count in batch)
        for text, count in (document for batch in batches for document in batch):
            if kept_tokens >= num_tokens:
                break
            if text.strip():
                documents.append(text)
                kept_tokens += count
                progress.update(min(count, num_tokens - progress.n))
        round_index += 1
    progress.close()
    seconds = time.time() - started

    if rank == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
        with open(staging, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in documents)
        manifest_path(output).unlink(missing_ok=True)  # the old file's manifest must not outlive it if we stop here
        os.replace(staging, output)
        settings = sampling_settings(num_tokens, seed, temperature, top_p, max_new_tokens, batch_size)
        write_manifest(output, model_dir, fingerprint_checkpoint(checkpoint), settings, len(documents), kept_tokens)
    if distributed:
        from adept_ds.runtime.distributed import shutdown_distributed

        del model
        shutdown_distributed()
    return {
        "output": str(output),
        "tokens": kept_tokens,
        "documents": len(documents),
        "sampled_tokens": sampled_tokens,
        "seconds": seconds,
        "tokens_per_second": sampled_tokens / max(seconds, 1e-9),
        "world_size": world_size,
        "start_token": tokenizer.convert_ids_to_tokens(start),
        "dtype": str(torch_dtype).removeprefix("torch."),
    }


def self_generated_corpus(
    model_dir: str | Path,
    tokens: int,
    cache_dir: str | Path,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> Path:
    """Self-replay text sampled from `model_dir` (the base model, not an expanded one), cached in `cache_dir` as
    `self_generated_<key>.jsonl`, key = the model's fingerprint and these settings: a complete file with a matching
    manifest is returned as it is, anything else is generated (in this process) first."""
    from adept_ds.data.self_replay import cached_corpus, sampling_settings
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.expand import MANIFEST_NAME, read_manifest

    if (Path(model_dir) / MANIFEST_NAME).is_file():  # its manifest would name the copy, which no run's check accepts
        source = read_manifest(model_dir)["source_model"]
        raise ValueError(f"{model_dir} is an expanded model: sample self-replay text from the model it was expanded from, {source}")
    fingerprint = fingerprint_checkpoint(open_checkpoint(model_dir))
    settings = sampling_settings(tokens, seed, temperature, top_p, max_new_tokens, batch_size)
    corpus, cached = cached_corpus(cache_dir, fingerprint, settings)
    if not cached:
        make_probe_corpus(model_dir, corpus, tokens, seed, temperature, top_p, batch_size, max_new_tokens)
    return corpus
