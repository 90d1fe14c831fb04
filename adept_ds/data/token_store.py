"""Token stores: a corpus tokenised and packed once into one memory-mapped file of token ids.

A store is a directory with `tokens.bin` (the packed token stream: documents tokenised, an EOS after
each, concatenated and cut into `block_size`-token blocks, the tail shorter than a block dropped),
`doc_starts.bin` (int64: the offset in that stream at which each document starts, ascending; format 2 on)
and `manifest.json` (format, tokenizer fingerprint, block size, counts, dtype, and the source files with
sizes and a content hash computed once). Ids are uint16 when the vocabulary fits, else uint32. Stores of
format 1 (no `doc_starts.bin`) still open; they serve every run but one that needs document boundaries
(`data.document_mask`, `data.loss_on_document_start: false`), which refuses them (`require_documents`).

A block's position ids restart at 0 at each document that starts inside it (`positions`); a block that
begins inside a document starts it at 0 too: a document split across two blocks is two documents for the
model, each part attending only to itself.

`prepare_store` tokenises in N worker processes (a `multiprocessing` pool over the corpus's chunks,
see corpus.py; results come back in order and are appended to the file as they arrive, so memory
stays at a few chunks whatever the corpus size). `datasets.map(num_proc=N)` would write Arrow caches of
int64 id lists: several times the final store on disk, and a text copy before that. The store is built
in a hidden sibling and renamed into place; a lock file lets one process (of any node on a shared
filesystem) build it while the others wait on the filesystem, never inside a collective (file_lock.py).

`open_store` reads only the manifest and the files' sizes: O(1) in the corpus size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adept_ds.data.corpus import Chunk, corpus_files, is_saved_dataset, pieces, plan_chunks, read_chunk
from adept_ds.runtime.distributed import usable_cpus
from adept_ds.runtime.file_lock import exclusive
from adept_ds.runtime.outputs import atomic_output_dir

STORE_FORMAT = "adept_ds.token_store/2"
"""Written now; format 1 (before document boundaries were recorded) is still read."""
READ_FORMATS = ("adept_ds.token_store/1", STORE_FORMAT)
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
DOC_STARTS = "doc_starts.bin"
DOC_START_DTYPE = np.dtype("<i8")
DOCS_PER_CALL = 256


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary, rules and EOS id: two stores with equal fingerprints hold the same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}\n{tokenizer.eos_token_id}".encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: the tokenizer's own batched call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no attention masks or BatchEncoding to build
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class TokenStore:
    """A prepared store: `store[indices]` is a (len(indices), block_size) int64 tensor of blocks."""

    path: Path
    manifest: dict
    tokens: np.ndarray
    doc_starts: np.ndarray | None = None
    """Where each document starts in `tokens`, ascending (a memory map); None in a format-1 store."""

    @property
    def block_size(self) -> int:
        return self.manifest["block_size"]

    @property
    def fingerprint(self) -> str:
        """What identifies the store's contents (sources, tokenizer, packing), without reading them."""
        identity = {key: self.manifest[key] for key in ("tokenizer_fingerprint", "block_size", "num_tokens", "max_tokens")}
        identity["sources"] = [(s["size"], s["sha256"]) for s in self.manifest["sources"]]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def __len__(self) -> int:
        return self.manifest["num_blocks"]

    def block(self, index: int) -> np.ndarray:
        """Block `index` as a view of the memory map: only its pages are read."""
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of a store with {len(self)} blocks")
        return self.tokens[index * self.block_size : (index + 1) * self.block_size]

    def __getitem__(self, indices) -> torch.Tensor:
        if isinstance(indices, slice):
            indices = range(*indices.indices(len(self)))
        return blocks_tensor([self.block(int(i)) for i in indices], self.block_size)

    def positions(self, index: int) -> np.ndarray:
        """Block `index`'s position ids (int64): 0 at the block's first token and at every document start inside it,
        counting up from there. Two binary searches over the document starts and O(block) numpy work."""
        self.require_documents("a block's position ids")
        start, size = index * self.block_size, self.block_size
        first = np.searchsorted(self.doc_starts, start, side="right")  # documents starting after the block's first token
        last = np.searchsorted(self.doc_starts, start + size, side="left")
        restarts = np.zeros(size, dtype=np.int64)
        inside = np.asarray(self.doc_starts[first:last], dtype=np.int64) - start
        restarts[inside] = inside
        return np.arange(size, dtype=np.int64) - np.maximum.accumulate(restarts)

    def require_documents(self, setting: str) -> None:
        """Refuse a store without document boundaries (format 1) for `setting`, which needs them."""
        if self.doc_starts is None:
            raise ValueError(
                f"token store {self.path} is of format {self.manifest['format']!r}, which records no document boundaries; "
                f"{setting} needs them: prepare it again (adept-ds prepare-data) to write {STORE_FORMAT!r}"
            )

    def check_compatible(self, tokenizer, block_size: int, vocab_size: int | None = None) -> None:
        """Refuse a store made with another tokenizer or block size, or holding ids the model has no embedding for."""
        manifest, where = self.manifest, f"token store {self.path}"
        if manifest["block_size"] != block_size:
            raise ValueError(f"{where} was packed in blocks of {manifest['block_size']} tokens, but the run uses {block_size}; "
                             f"prepare it again with --block-size {block_size} or set data.block_size={manifest['block_size']}")  # fmt: skip
        fingerprint = tokenizer_fingerprint(tokenizer)
        if manifest["tokenizer_fingerprint"] != fingerprint:
            raise ValueError(f"{where} was tokenised with another tokenizer (fingerprint {manifest['tokenizer_fingerprint']}, "
                             f"this model's is {fingerprint}); prepare it again with this model's tokenizer")  # fmt: skip
        if vocab_size is not None and manifest["max_token_id"] >= vocab_size:
            raise ValueError(f"{where} holds token id {manifest['max_token_id']}, but the model's vocabulary has {vocab_size} "
                             f"ids (0..{vocab_size - 1}); use the tokenizer that matches the model")  # fmt: skip


def blocks_tensor(rows: list[np.ndarray], block_size: int) -> torch.Tensor:
    """Blocks (views of a store's memory map) as one (rows, block_size) int64 tensor: the model's input ids."""
    return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.empty(0, block_size, dtype=torch.int64)


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_store(path: str | Path) -> TokenStore:
    """Open a prepared store: reads the manifest and its files' sizes, nothing of their contents."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"token store {path}: cannot read {MANIFEST} ({err})") from None
    if manifest.get("format") not in READ_FORMATS:
        raise ValueError(f"token store {path}: format {manifest.get('format')!r} is not one of {', '.join(READ_FORMATS)}; prepare it again")
    tokens = _map(path / TOKENS, np.dtype(manifest["dtype"]), manifest["num_tokens"], "tokens")
    doc_starts = None
    if manifest["format"] != READ_FORMATS[0]:
        doc_starts = _map(path / DOC_STARTS, DOC_START_DTYPE, manifest["num_doc_starts"], "document starts")
    return TokenStore(path=path, manifest=manifest, tokens=tokens, doc_starts=doc_starts)


def _map(file: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    """`count` values of `dtype` in `file`, memory-mapped, after checking its size against the manifest's count."""
    expected = count * dtype.itemsize
    actual = file.stat().st_size if file.is_file() else 0
    if actual != expected:
        raise ValueError(f"token store {file.parent}: {file.name} has {actual} bytes, the manifest promises {expected} "
                         f"({count} {dtype.name} {what}); the file is truncated or damaged: prepare it again")  # fmt: skip
    return np.memmap(file, dtype=dtype, mode="r") if expected else np.empty(0, dtype)


# -- preparing ------------------------------------------------------------------------------------

_worker: dict = {}


def _start_worker(tokenizer, text_field: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    _worker.update(tokenizer=tokenizer, text_field=text_field, dtype=np.dtype(dtype))


def _tokenize_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's documents as a flat id array (EOS after each document), and where each document starts in it."""
    tokenizer, eos = _worker["tokenizer"], _worker["tokenizer"].eos_token_id
    texts = read_chunk(chunk, _worker["text_field"])
    docs = []
    for start in range(0, len(texts), DOCS_PER_CALL):
        docs += [ids for ids in encode_documents(tokenizer, texts[start : start + DOCS_PER_CALL]) if ids]
    total = sum(len(ids) for ids in docs) + len(docs)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(ids, (eos,)) for ids in docs), dtype=np.int64, count=total)
    if flat.size and int(flat.max()) > np.iinfo(_worker["dtype"]).max:
        raise ValueError(f"token id {int(flat.max())} does not fit the store's {_worker['dtype'].name}")
    lengths = np.fromiter((len(ids) + 1 for ids in docs), dtype=np.int64, count=len(docs))
    return flat.astype(_worker["dtype"]), np.cumsum(lengths) - lengths


def _hash_sources(files: list[Path], hashes: dict, stop: threading.Event) -> None:
    """sha256 of every source file, once, beside the tokenising (hashlib releases the GIL on big reads)."""
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                if stop.is_set():
                    return
                digest.update(block)
        hashes[str(file)] = digest.hexdigest()


def prepare_store(
    source: str | Path,
    output: str | Path,
    tokenizer,
    block_size: int,
    text_field: str = "text",
    num_workers: int | None = None,
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> TokenStore:
    """Tokenise and pack `source` into a store at `output`; `max_tokens` stops after that many tokens (a prefix).

    If another process is preparing the same `output`, wait for it and open its store.
    """
    from tqdm import tqdm

    if block_size < 2:
        raise ValueError(f"block size {block_size}: need at least 2 tokens per block")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which separates packed documents; set eos_token")
    output = Path(output)
    files = corpus_files(source)
    chunks = plan_chunks(source, files=files)
    if not chunks:
        raise ValueError(f"corpus {source} is empty")
    with exclusive(output.with_name(output.name + ".lock"), lambda: is_store(output), f"preparing {output}") as holder:
        if not holder:
            return open_store(output)
        num_workers = max(1, num_workers or usable_cpus())
        dtype = token_dtype(len(tokenizer))
        limit = None if max_tokens is None else max(block_size, max_tokens // block_size * block_size)
        started = time.perf_counter()
        hashes: dict = {}
        stop_hashing = threading.Event()
        with atomic_output_dir(output) as staging:
            try:
                with open(staging / TOKENS, "wb") as tokens_file, open(staging / DOC_STARTS, "wb") as starts_file:
                    progress = tqdm(desc=f"preparing {Path(source).name}", unit="tok", unit_scale=True, disable=not show_progress)
                    hasher = threading.Thread(target=_hash_sources, args=(files, hashes, stop_hashing), daemon=True)
                    outputs = (tokens_file, starts_file)
                    counts = _write_tokens(chunks, outputs, tokenizer, text_field, dtype, num_workers, limit, progress, holder, hasher)
                    written, documents, max_id, complete = counts
                    progress.close()
                    num_blocks = written // block_size
                    if num_blocks == 0:
                        raise ValueError(f"corpus {source} has {written} tokens, fewer than one block of {block_size}")
                    tokens_file.truncate(num_blocks * block_size * dtype.itemsize)  # the tail shorter than a block
                    starts_file.flush()
                    num_doc_starts = _starts_before(staging / DOC_STARTS, num_blocks * block_size)
                    starts_file.truncate(num_doc_starts * DOC_START_DTYPE.itemsize)  # documents that start in that tail
                if not complete:
                    stop_hashing.set()  # a prefix: hashing whole files would read what the store never used
                hasher.join()
            finally:
                stop_hashing.set()
            manifest = {
                "format": STORE_FORMAT,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id,
                "dtype": dtype.name,
                "block_size": block_size,
                "num_tokens": num_blocks * block_size,
                "num_blocks": num_blocks,
                "tokens_read": written,
                "num_documents": documents,
                "num_doc_starts": num_doc_starts,
                "max_token_id": max_id,
                "text_field": text_field,
                "max_tokens": max_tokens,
                "complete": complete,
                "sources": [
                    {"path": str(f.absolute()), "size": f.stat().st_size, "sha256": hashes.get(str(f)) if complete else None} for f in files
                ],
                "source": str(Path(source).absolute()),
                "saved_dataset": is_saved_dataset(Path(source)),
                "workers": num_workers,
                "seconds": round(time.perf_counter() - started, 3),
                "created_by": f"{socket.gethostname()} pid {os.getpid()}",
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return open_store(output)


def _starts_before(file: Path, num_tokens: int) -> int:
    """How many of the ascending document starts in `file` lie before token `num_tokens`."""
    if file.stat().st_size == 0:
        return 0
    return int(np.searchsorted(np.memmap(file, dtype=DOC_START_DTYPE, mode="r"), num_tokens, side="left"))


def _write_tokens(chunks, files, tokenizer, text_field, dtype, num_workers, limit, progress, holder, hasher):
    """Tokenise `chunks` in a pool and append their ids, and their documents' starts offset to the stream's, in
    corpus order to `files` (tokens, document starts); stop at `limit` tokens.

    Returns (tokens written, documents, largest id, whether every chunk was used whole).
    """
    import multiprocessing

    written = documents = max_id = 0
    complete = True
    # fork: workers inherit the imported tokenizer at once (spawn would re-import torch in each)
    context = multiprocessing.get_context("fork")
    with context.Pool(num_workers, initializer=_start_worker, initargs=(tokenizer, text_field, dtype.str)) as pool:
        # Threads start after the fork: the workers come from a process with no other thread of ours.
        hasher.start()
        holder.start_heartbeat()
        results = _in_order(pool, _tokenize_chunk, pieces(chunks), window=2 * num_workers)
        tokens_file, starts_file = files
        for (ids, starts), last in _with_last(results):
            if limit is not None and written + ids.size >= limit:
                complete = last and written + ids.size == limit
                ids = ids[: limit - written]
                starts = starts[starts < ids.size]
            tokens_file.write(memoryview(np.ascontiguousarray(ids)).cast("B"))
            starts_file.write(memoryview((starts + written).astype(DOC_START_DTYPE)).cast("B"))
            written += ids.size
            documents += starts.size
            max_id = max(max_id, int(ids.max()) if ids.size else 0)
            progress.update(ids.size)  # tqdm shows the rate in tokens/s
            if limit is not None and written >= limit:
                break
        pool.terminate()
    return written, documents, max_id, complete


def _in_order(pool, function, items, window: int):
    """`pool.imap(function, items)` with at most `window` items submitted ahead of the one being consumed.

    Pool.imap's feeder thread takes items as fast as it can: over a compressed corpus, whose pieces carry
    their text, it would decompress the whole file into the task queue. Here memory stays at `window` pieces."""
    import collections

    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _with_last(iterable):
    """(item, whether it is the last) for each item."""
    iterator = iter(iterable)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True
