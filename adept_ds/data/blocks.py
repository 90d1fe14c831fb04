"""A run's corpora as token stores (token_store.py), and the blocks of a batch.

`load_blocks` accepts either a prepared store (`adept-ds prepare-data`), opened as it is, or a raw
corpus (corpus.py: JSONL/JSON, text, Parquet, a directory of them, a `datasets.save_to_disk` dir),
prepared on first use into the block cache under a key of its files' paths, sizes and modification
times plus the tokenizer and packing: a later start finds it with a few `stat` calls, without reading
the corpus. Any number of processes may ask at once: one prepares, the others wait for it on the
filesystem (never inside a collective, which would time out on a big corpus).

A batch (`gather_batch`) is its blocks' ids, the labels the loss scores, and, with the document mask
(`Packing`, from data.document_mask), each block's position ids restarting at every document start. Given
those position ids, no attention mask and no KV cache (use_cache=False: with a cache, transformers skips
this), transformers 5 builds the block-diagonal causal mask itself (masking_utils.find_packed_sequence_indices,
for eager, sdpa and flex attention), and flash-attention 2 takes its varlen path, which it does only for a
batch of one row: for it the batch is passed as one row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
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
    documents: str = "",
) -> TokenStore:
    """The token store of a corpus; `max_tokens` caps what a raw corpus is tokenised for (a prefix).

    The store is checked against the tokenizer, the block size and (when given) the model's vocabulary.
    `documents` names the setting that needs document boundaries: a store without them (format 1) is refused.
    """
    if is_store(path):
        store = open_store(path)
    else:  # the key holds the store format: a raw corpus cached before document boundaries is prepared again
        target = Path(cache_dir) / raw_corpus_key(path, tokenizer, block_size, text_field, max_tokens)
        if is_store(target):
            store = open_store(target)
        else:
            store = prepare_store(path, target, tokenizer, block_size, text_field, num_workers, max_tokens, show_progress)
    store.check_compatible(tokenizer, block_size, vocab_size)
    if documents:
        store.require_documents(documents)
    return store


def usable_blocks(store: TokenStore, max_tokens: int | None) -> int:
    """How many of the store's first blocks a token budget covers (all of them without one)."""
    return len(store) if max_tokens is None else min(len(store), max(1, max_tokens // store.block_size))


def gather_blocks(stores: list[TokenStore], pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The (source, block) pairs of a batch as one (len(pairs), block_size) int64 tensor, in order."""
    return blocks_tensor([stores[source].block(index) for source, index in pairs], stores[0].block_size)


IGNORE_INDEX = -100
"""A label the loss skips (torch's and Hugging Face's ignore_index)."""


@dataclass(frozen=True)
class Packing:
    """How the documents packed into a block meet the model (data.document_mask, data.loss_on_document_start)."""

    document_mask: bool = False
    """Pass position ids that restart at each document: a token attends only to its own document's earlier tokens."""
    loss_on_document_start: bool = True
    """Score each document's first token, which the previous document's last token (its EOS) predicts; False: drop
    that label (Megatron's eod_mask_loss). The block's first token has no label either way."""
    one_row: bool = False
    """Pass a batch as one row of its blocks end to end (flash-attention 2 reads document boundaries from position
    ids only in a batch of one row); each block's first label is dropped, so no block predicts the next one."""

    @property
    def needs_documents(self) -> bool:
        """Whether batches need the stores' document boundaries."""
        return self.document_mask or not self.loss_on_document_start

    def setting(self) -> str:
        """The setting that needs document boundaries, for a store refused for lacking them ("" if none does)."""
        if self.document_mask:
            return "data.document_mask"
        return "" if self.loss_on_document_start else "data.loss_on_document_start=false"


@dataclass(frozen=True)
class Batch:
    """Blocks as the model takes them: ids [B, T], the labels the loss scores, and position ids with the document mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    """The ids, with IGNORE_INDEX where a label is dropped. Position t predicts label t+1, as in Hugging Face."""
    position_ids: torch.Tensor | None = None
    one_row: bool = False

    @classmethod
    def of(cls, blocks: torch.Tensor | Batch) -> Batch:
        """A plain (N, T) tensor of blocks as a batch without the document mask (labels = ids); a batch as it is."""
        return blocks if isinstance(blocks, Batch) else cls(blocks, blocks)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, rows) -> Batch:
        positions = None if self.position_ids is None else self.position_ids[rows]
        return replace(self, input_ids=self.input_ids[rows], labels=self.labels[rows], position_ids=positions)

    def to(self, device) -> Batch:
        positions = None if self.position_ids is None else self.position_ids.to(device)
        return replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device), position_ids=positions)

    @property
    def targets(self) -> torch.Tensor:
        """What positions 0 .. T-2 predict: labels 1 .. T-1 (IGNORE_INDEX where dropped)."""
        return self.labels[:, 1:]

    @property
    def predicted(self) -> int:
        """The tokens the loss scores."""
        return int((self.targets != IGNORE_INDEX).sum())

    def model_inputs(self, labels: bool = True) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward: ids, (with `labels`) labels, and the position ids when the document
        mask is on. With the defaults (no mask, every label kept) the call is exactly `model(input_ids=ids, labels=ids)`,
        as before the mask existed."""
        inputs = {"input_ids": self.input_ids}
        if labels:
            inputs["labels"] = self.labels
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if self.one_row:  # each block's first label is already dropped (gather_batch): no block predicts the next
            inputs = {key: value.reshape(1, -1) for key, value in inputs.items()}
        return inputs


def gather_batch(stores: list[TokenStore], pairs: list[tuple[int, int]], packing: Packing = Packing()) -> Batch:
    """The (source, block) pairs of a batch as a `Batch`, in order, laid out as `packing` says."""
    ids = gather_blocks(stores, pairs)
    if not packing.needs_documents:
        return Batch(ids, ids)
    rows = [stores[source].positions(index) for source, index in pairs]
    positions = torch.from_numpy(np.stack(rows) if rows else np.empty(ids.shape, dtype=np.int64))
    labels = ids.clone()
    if not packing.loss_on_document_start:  # each document's first token inside a block (the first has no label anyway)
        labels[:, 1:][positions[:, 1:] == 0] = IGNORE_INDEX
    if packing.one_row:  # end to end, a block's first token would be predicted by the block before it
        labels[:, 0] = IGNORE_INDEX
    return Batch(ids, labels, positions if packing.document_mask else None, packing.one_row)


def store_batch(store: TokenStore, indices, packing: Packing = Packing()) -> Batch:
    """Blocks `indices` of one store as a `Batch` (probing and evaluation)."""
    return gather_batch([store], [(0, int(index)) for index in indices], packing)
