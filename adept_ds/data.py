"""Text corpora -> fixed-length token blocks, with `datasets`, cached on disk as Arrow.

A corpus is a JSONL/JSON, plain-text or Parquet file, a directory of such files, or a directory
written by `datasets.Dataset.save_to_disk`. Documents are tokenised, an EOS token appended to each,
concatenated, and cut into blocks of `block_size` tokens (the tail shorter than a block is dropped),
so a document longer than a block simply spans several blocks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import torch
from datasets import Dataset

from adept_ds.outputs import atomic_output_dir

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet"}
CACHE_FORMAT = "adept_ds.blocks/1"


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _BUILDERS)
        if not files:
            raise ValueError(f"corpus directory {path} holds no {'/'.join(sorted(_BUILDERS))} files")
    unsupported = [str(f) for f in files if f.suffix not in _BUILDERS]
    if unsupported:
        raise ValueError(f"unsupported corpus file {unsupported[0]}: use one of {', '.join(sorted(_BUILDERS))}")
    if len({_BUILDERS[f.suffix] for f in files}) > 1:
        raise ValueError(f"corpus {path} mixes file types; keep one of jsonl/json, txt or parquet per corpus")
    return files


def _check_utf8(file: Path) -> None:
    with open(file, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"corpus file {file} line {number}: byte {err.start} ({line[err.start : err.start + 1]!r}) is not UTF-8 "
                    f"in {line[max(0, err.start - 20) : err.start + 20]!r}; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


def read_corpus(path: str | Path, text_field: str = "text") -> Dataset:
    """Load a corpus as a Dataset with one string column, `text_field`."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"corpus {path} does not exist")
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"{path} is a DatasetDict with splits {list(dataset)}; point at one split's directory")
    else:
        files = _corpus_files(path)
        builder = _BUILDERS[files[0].suffix]
        for file in files:
            if file.stat().st_size == 0:
                raise ValueError(f"corpus file {file} is empty")
            if builder != "parquet":  # Arrow's JSON reader keeps bad bytes and fails later, deep inside tokenisation
                _check_utf8(file)
        try:
            dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as err:  # pyarrow/json errors deep inside datasets: name the corpus and the cause
            raise ValueError(f"cannot read corpus {path} as {builder}: {err}") from err
    if text_field not in dataset.column_names:
        raise ValueError(f"corpus {path} has no text field '{text_field}' (fields: {dataset.column_names}); set the text field name")
    if len(dataset) == 0:
        raise ValueError(f"corpus {path} is empty")
    dataset = dataset.select_columns([text_field])
    if dataset.features[text_field].dtype != "string":
        raise ValueError(f"corpus {path}: field '{text_field}' holds {dataset.features[text_field]}, not text")
    return dataset


def pack_blocks(corpus: Dataset, tokenizer, block_size: int, text_field: str = "text") -> Dataset:
    """Tokenise documents (EOS after each), concatenate and cut into `block_size`-token blocks."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: need at least 2 tokens per block")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which separates packed documents; set eos_token")

    def tokenize(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids if doc]}

    def group(batch):
        flat = [token for doc in batch["ids"] for token in doc]
        usable = len(flat) // block_size * block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, usable, block_size)]}

    tokens = corpus.map(tokenize, batched=True, remove_columns=corpus.column_names, desc="tokenising")
    # Packed per 1000 documents (as transformers' run_clm does): memory stays bounded on big corpora,
    # at the cost of dropping under one block of tail tokens per 1000 documents.
    blocks = tokens.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc="packing")
    if len(blocks) == 0:
        total = sum(len(ids) for ids in tokens["ids"])
        raise ValueError(f"corpus has {total} tokens, fewer than one block of {block_size}")
    return blocks.with_format("torch")


def _hash_path(digest, path: Path) -> None:
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)


def blocks_fingerprint(path: str | Path, tokenizer, block_size: int, text_field: str = "text") -> str:
    """Hash of the corpus bytes, the tokenizer (vocabulary + rules) and the packing parameters."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{block_size}:{text_field}".encode())
    _hash_path(digest, Path(path))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(str(tokenizer.eos_token_id).encode())
    return digest.hexdigest()[:20]


def load_blocks(
    path: str | Path, tokenizer, block_size: int, cache_dir: str | Path, text_field: str = "text", fingerprint: str | None = None
) -> Dataset:
    """Blocks of a corpus, from the Arrow cache `cache_dir/<fingerprint>` when present, else built and cached.

    Pass `fingerprint` (from `blocks_fingerprint`) when the caller already has it, to hash the corpus once.
    """
    target = Path(cache_dir) / (fingerprint or blocks_fingerprint(path, tokenizer, block_size, text_field))
    if not (target / "dataset_info.json").is_file():
        blocks = pack_blocks(read_corpus(path, text_field), tokenizer, block_size, text_field)
        with atomic_output_dir(target, overwrite=True) as staging:
            blocks.save_to_disk(str(staging))
    return datasets.load_from_disk(str(target)).with_format("torch")


def sample_order(num_samples: int, seed: int, start: int, count: int) -> list[int]:
    """Samples `start .. start+count-1` of an endless stream of per-epoch shuffles of the corpus.

    The stream depends only on (num_samples, seed), so a run resumed at position `start` sees
    exactly the samples an uninterrupted run would have seen from there on.
    """
    order: list[int] = []
    position = start
    while len(order) < count:
        epoch, offset = divmod(position, num_samples)
        permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        taken = permutation[offset : offset + count - len(order)]
        order.extend(taken)
        position += len(taken)
    return order
