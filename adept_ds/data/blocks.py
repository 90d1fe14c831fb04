"""A run's corpora as token stores (token_store.py), and the blocks of a batch.

`load_blocks` accepts either a prepared store (`adept-ds prepare-data`), opened as it is, or a raw
corpus (corpus.py: JSONL/JSON, text, Parquet, a directory of them, a `datasets.save_to_disk` dir),
prepared on first use into the block cache under a key of its files' paths, sizes and modification
times plus the tokenizer and packing: a later start finds it with a few `stat` calls, without reading
the corpus. Any number of processes may ask at once: one prepares, the others wait for it on the
filesystem (never inside a collective, which would time out on a big corpus).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from adept_ds.data.corpus import corpus_files
from adept_ds.data.token_store import STORE_FORMAT, TokenStore, blocks_tensor, is_store, open_store, prepare_store, tokenizer_fingerprint


def raw_corpus_key(path: str | Path, tokenizer, block_size: int, text_field: str, max_tokens: int | None) -> str:
    """Cache key of a raw corpus: file paths, sizes and mtimes (stat only), tokenizer, packing, token limit."""
    stats = [(f, f.stat()) for f in corpus_files(path)]
    files = [(str(f.absolute()), stat.st_size, stat.st_mtime_ns) for f, stat in stats]
    identity = [STORE_FORMAT, tokenizer_fingerprint(tokenizer), block_size, text_field, max_tokens, files]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]


def load_blocks(
    path: str | Path,
    tokenizer,
    block_size: int,
    cache_dir: str | Path,
    text_field: str = "text",
    max_tokens: int | None = None,
    vocab_size: int | None = None,
    num_workers: int | None = None,
    show_progress: bool = False,
) -> TokenStore:
    """The token store of a corpus; `max_tokens` caps what a raw corpus is tokenised for (a prefix).

    The store is checked against the tokenizer, the block size and (when given) the model's vocabulary.
    """
    if is_store(path):
        store = open_store(path)
    else:
        target = Path(cache_dir) / raw_corpus_key(path, tokenizer, block_size, text_field, max_tokens)
        if is_store(target):
            store = open_store(target)
        else:
            store = prepare_store(path, target, tokenizer, block_size, text_field, num_workers, max_tokens, show_progress)
    store.check_compatible(tokenizer, block_size, vocab_size)
    return store


def usable_blocks(store: TokenStore, max_tokens: int | None) -> int:
    """How many of the store's first blocks a token budget covers (all of them without one)."""
    return len(store) if max_tokens is None else min(len(store), max(1, max_tokens // store.block_size))


def gather_blocks(stores: list[TokenStore], pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The (source, block) pairs of a batch as one (len(pairs), block_size) int64 tensor, in order."""
    return blocks_tensor([stores[source].block(index) for source, index in pairs], stores[0].block_size)
