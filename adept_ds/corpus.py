"""Reading raw corpora in independent chunks, so that worker processes can tokenise them in parallel.

A corpus is a JSONL/JSON, plain-text or Parquet file, a directory of such files, or a directory written
by `datasets.Dataset.save_to_disk`. `plan_chunks` cuts it into `Chunk`s (byte ranges ending at a line
break, Parquet row groups, row ranges of a saved dataset) in corpus order; `read_chunk` returns one
chunk's documents. A worker never holds more than one chunk, so memory does not grow with the corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FILE_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".text": "text", ".parquet": "parquet"}
CHUNK_BYTES = 8 << 20
"""Text per chunk: about 2 M tokens, seconds of work for one worker; a few chunks per worker in flight."""
DATASET_ROWS = 20_000


@dataclass(frozen=True)
class Chunk:
    path: str
    kind: str
    """jsonl, json_array, text, parquet (start = row group) or dataset (start/end = rows)."""
    start: int
    end: int


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file())


def corpus_files(path: str | Path) -> list[Path]:
    """The files of a corpus, checked: they exist, are of one supported kind, and none is empty."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"corpus {path} does not exist")
    if is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_KINDS)
        if not files:
            raise ValueError(f"corpus directory {path} holds no {'/'.join(sorted(FILE_KINDS))} files")
    unsupported = [str(f) for f in files if f.suffix not in FILE_KINDS]
    if unsupported:
        raise ValueError(f"unsupported corpus file {unsupported[0]}: use one of {', '.join(sorted(FILE_KINDS))}")
    if len({FILE_KINDS[f.suffix] for f in files}) > 1:
        raise ValueError(f"corpus {path} mixes file types; keep one of jsonl/json, txt or parquet per corpus")
    for file in files:
        if file.stat().st_size == 0:
            raise ValueError(f"corpus file {file} is empty")
    return files


def plan_chunks(path: str | Path, chunk_bytes: int | None = None, files: list[Path] | None = None) -> list[Chunk]:
    """The corpus cut into chunks, in order; reads only a few bytes around each cut.

    `files`: the corpus's files when the caller already has them from `corpus_files` (listed once)."""
    path, chunk_bytes = Path(path), chunk_bytes or CHUNK_BYTES
    files = files if files is not None else corpus_files(path)
    if is_saved_dataset(path):
        import datasets

        rows = len(datasets.load_from_disk(str(path)))
        return [Chunk(str(path), "dataset", start, min(start + DATASET_ROWS, rows)) for start in range(0, rows, DATASET_ROWS)]
    chunks = []
    for file in files:
        kind = FILE_KINDS[file.suffix]
        if kind == "parquet":
            import pyarrow.parquet as pq

            groups = pq.ParquetFile(file).metadata.num_row_groups
            chunks += [Chunk(str(file), "parquet", group, group + 1) for group in range(groups)]
        elif kind == "jsonl" and _first_byte(file) == b"[":  # a .json array: one chunk (it cannot be cut at lines)
            chunks.append(Chunk(str(file), "json_array", 0, file.stat().st_size))
        else:
            chunks += [Chunk(str(file), kind, start, end) for start, end in _line_ranges(file, chunk_bytes)]
    return chunks


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Every document of a small corpus, in order (tests, benchmarks); training streams chunks instead."""
    return [text for chunk in plan_chunks(path) for text in read_chunk(chunk, text_field)]


def _first_byte(file: Path) -> bytes:
    with open(file, "rb") as handle:
        return handle.read(4096).lstrip()[:1]


def _line_ranges(file: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes`, each ending just after a line break (or at the end of the file)."""
    size = file.stat().st_size
    ranges, start = [], 0
    with open(file, "rb") as handle:
        while start < size:
            handle.seek(min(start + chunk_bytes, size))
            handle.readline()  # on to the end of the line the cut fell in
            end = min(handle.tell(), size)
            ranges.append((start, end))
            start = end
    return ranges


def read_chunk(chunk: Chunk, text_field: str) -> list[str]:
    """The documents of one chunk (empty ones included: the tokeniser drops them)."""
    if chunk.kind == "dataset":
        return _dataset_texts(chunk, text_field)
    if chunk.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(chunk.path).read_row_group(chunk.start)
        return _text_column(table, text_field, chunk.path)
    with open(chunk.path, "rb") as handle:
        handle.seek(chunk.start)
        raw = handle.read(chunk.end - chunk.start)
    _check_utf8(raw, chunk)
    if chunk.kind == "text":
        lines = raw.decode("utf-8").split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines
    if chunk.kind == "json_array":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot read corpus file {chunk.path} as JSON: {err}") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"corpus file {chunk.path}: a .json corpus must be a list of records or JSON Lines")
        return _text_values([r.get(text_field) for r in records], records[0].keys() if records else [], text_field, chunk.path)
    import pyarrow as pa
    import pyarrow.json as pj

    try:  # Arrow's reader: fast, and parses the chunk without a Python object per record
        table = pj.read_json(pa.BufferReader(raw), read_options=pj.ReadOptions(use_threads=False, block_size=len(raw) + 1))
    except pa.ArrowInvalid as err:
        raise ValueError(f"cannot read corpus file {chunk.path} (bytes {chunk.start}-{chunk.end}) as JSON Lines: {err}") from None
    return _text_column(table, text_field, chunk.path)


def _text_column(table, text_field: str, where: str) -> list[str]:
    import pyarrow.types as pat

    if text_field not in table.column_names:
        raise ValueError(f"corpus {where} has no text field '{text_field}' (fields: {table.column_names}); set the text field name")
    column = table.column(text_field)
    if not (pat.is_string(column.type) or pat.is_large_string(column.type) or pat.is_null(column.type)):
        raise ValueError(f"corpus {where}: field '{text_field}' holds {column.type}, not text")
    return [text or "" for text in column.to_pylist()]


def _text_values(values: list, fields, text_field: str, where: str) -> list[str]:
    if values and all(value is None for value in values):
        raise ValueError(f"corpus {where} has no text field '{text_field}' (fields: {list(fields)}); set the text field name")
    if not all(value is None or isinstance(value, str) for value in values):
        raise ValueError(f"corpus {where}: field '{text_field}' holds non-text values")
    return [value or "" for value in values]


_dataset_cache: dict[str, object] = {}


def _dataset_texts(chunk: Chunk, text_field: str) -> list[str]:
    import datasets

    if chunk.path not in _dataset_cache:  # memory-mapped: opening is cheap, and done once per worker
        dataset = datasets.load_from_disk(chunk.path)
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"{chunk.path} is a DatasetDict with splits {list(dataset)}; point at one split's directory")
        _dataset_cache[chunk.path] = dataset
    dataset = _dataset_cache[chunk.path]
    table = dataset.with_format("arrow")[chunk.start : chunk.end]
    return _text_column(table, text_field, chunk.path)


def _check_utf8(raw: bytes, chunk: Chunk) -> None:
    """Arrow's JSON reader keeps bad bytes and fails later, deep inside tokenisation: name the line and byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lines_before = 0  # the error path only: count the lines of the file before this chunk
        with open(chunk.path, "rb") as handle:
            for offset in range(0, chunk.start, 1 << 22):
                lines_before += handle.read(min(1 << 22, chunk.start - offset)).count(b"\n")
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        number = lines_before + raw.count(b"\n", 0, err.start) + 1
        line = raw[line_start : raw.find(b"\n", err.start) if b"\n" in raw[err.start :] else len(raw)]
        at = err.start - line_start
        raise ValueError(
            f"corpus file {chunk.path} line {number}: byte {at} ({line[at : at + 1]!r}) is not UTF-8 "
            f"in {line[max(0, at - 20) : at + 20]!r}; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
