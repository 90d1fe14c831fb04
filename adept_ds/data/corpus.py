"""Reading raw corpora in independent pieces, so that worker processes can tokenise them in parallel.

A corpus is a JSONL/JSON, plain-text or Parquet file (JSONL, JSON and text also gzip- or zstd-compressed:
`.jsonl.gz`, `.txt.zst`, ...), a directory of such files (of any mix of these formats: each file is read by
its own reader), or a directory written by `datasets.Dataset.save_to_disk`. `plan_chunks` cuts it into
`Chunk`s in corpus order (byte ranges ending at a line break, Parquet row groups, row ranges of a saved
dataset); `read_chunk` returns one chunk's documents. A compressed file cannot be cut by offset, so it is
one *stream* chunk: `pieces` decompresses it as a stream and yields pieces of about CHUNK_BYTES of text,
each ending at a line break and carrying its bytes, which a worker then reads like any chunk. Nothing is
ever decompressed whole, in memory or on disk, and a worker never holds more than one piece.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".text": "text", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
"""Compressed JSONL, JSON and text (not Parquet, which compresses inside)."""
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
    """Byte range of the (decompressed) text; -1: to the end of a compressed stream."""
    compression: str | None = None
    """gzip or zstd: a stream chunk, which `pieces` turns into pieces carrying their bytes."""
    data: bytes | None = None
    """A piece of a compressed stream: its decompressed bytes."""
    lines_before: int = 0
    """A piece: the lines of the stream before it (to name a bad line)."""


def file_format(path: Path) -> tuple[str, str | None] | None:
    """(format, compression) of a corpus file from its suffixes (`a.jsonl.gz` -> jsonl, gzip); None if unsupported."""
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    kind = FORMATS.get(suffixes[-1]) if suffixes else None
    if kind is None or (compression and kind == "parquet"):
        return None
    return kind, compression


def supported_names() -> str:
    plain = sorted(FORMATS)
    return ", ".join(plain) + " (" + ", ".join(f"{s}{c}" for s in (".jsonl", ".json", ".txt") for c in (".gz", ".zst")) + " compressed)"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file())


def corpus_files(path: str | Path) -> list[Path]:
    """The files of a corpus, checked: they exist, are of supported formats, and none is empty."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"corpus {path} does not exist")
    if is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_file():
        if file_format(path) is None:
            raise ValueError(f"unsupported corpus file {path}: use one of {supported_names()}")
        files = [path]
    else:  # a directory: its corpus files, whatever else it holds (a README, a .DS_Store)
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p) is not None)
        if not files:
            raise ValueError(f"corpus directory {path} holds no corpus files ({supported_names()})")
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
        kind, compression = file_format(file)
        if compression:
            chunks.append(Chunk(str(file), kind, 0, -1, compression))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            groups = pq.ParquetFile(file).metadata.num_row_groups
            chunks += [Chunk(str(file), "parquet", group, group + 1) for group in range(groups)]
        elif kind == "jsonl" and _first_byte(file) == b"[":  # a .json array: one chunk (it cannot be cut at lines)
            chunks.append(Chunk(str(file), "json_array", 0, file.stat().st_size))
        else:
            chunks += [Chunk(str(file), kind, start, end) for start, end in _line_ranges(file, chunk_bytes)]
    return chunks


def pieces(chunks: list[Chunk], chunk_bytes: int | None = None) -> Iterator[Chunk]:
    """The chunks with every compressed stream cut into pieces that carry their bytes, lazily, in order."""
    for chunk in chunks:
        if chunk.compression is None:
            yield chunk
        else:
            yield from _stream_pieces(chunk, chunk_bytes or CHUNK_BYTES)


def _open_stream(chunk: Chunk):
    """(a binary stream of the decompressed text, the errors its decompressor raises on a damaged file)."""
    if chunk.compression == "gzip":
        import gzip

        return gzip.open(chunk.path, "rb"), (OSError, EOFError)  # gzip.BadGzipFile is an OSError
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"corpus file {chunk.path} is zstd-compressed: pip install zstandard") from None
    return zstandard.ZstdDecompressor().stream_reader(open(chunk.path, "rb"), closefd=True), (zstandard.ZstdError, OSError)


def _stream_pieces(chunk: Chunk, chunk_bytes: int) -> Iterator[Chunk]:
    """A compressed file as pieces of ~chunk_bytes decompressed bytes, each ending at a line break."""
    offset, lines, data = 0, 0, b""
    first = b""  # the stream's first non-blank byte; b"[": a JSON array, which cannot be cut at lines: read it whole
    stream, errors = _open_stream(chunk)
    with stream:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except errors as err:
                raise ValueError(f"cannot decompress corpus file {chunk.path} ({chunk.compression}): {err}") from None
            if not block:
                break
            data += block
            first = first or data.lstrip()[:1]
            if first in (b"", b"["):
                continue  # nothing but blanks yet, or an array
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                continue  # no line break yet (a line longer than a piece): read on
            piece, data = data[:cut], data[cut:]
            yield replace(chunk, start=offset, end=offset + cut, data=piece, lines_before=lines)
            offset, lines = offset + cut, lines + piece.count(b"\n")
    if data:
        kind = "json_array" if first == b"[" else chunk.kind
        yield replace(chunk, kind=kind, start=offset, end=offset + len(data), data=data, lines_before=lines)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Every document of a small corpus, in order (tests, benchmarks); training streams chunks instead."""
    return [text for chunk in pieces(plan_chunks(path)) for text in read_chunk(chunk, text_field)]


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
    """The documents of one chunk or piece (empty ones included: the tokeniser drops them)."""
    if chunk.compression is not None and chunk.data is None:
        raise ValueError(f"{chunk.path} is compressed: read it through `pieces`")
    if chunk.kind == "dataset":
        return _dataset_texts(chunk, text_field)
    if chunk.kind == "parquet":
        import pyarrow.parquet as pq

        # one thread: the tokeniser pool already runs a reader per core (Arrow's own pool would size itself by the machine)
        table = pq.ParquetFile(chunk.path).read_row_group(chunk.start, use_threads=False)
        return _text_column(table, text_field, chunk.path)
    if chunk.data is not None:
        raw = chunk.data
    else:
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


def _lines_before(chunk: Chunk) -> int:
    """Lines of the file before a chunk: a piece knows; a plain chunk counts them (the error path only)."""
    if chunk.data is not None:
        return chunk.lines_before
    count = 0
    with open(chunk.path, "rb") as handle:
        for offset in range(0, chunk.start, 1 << 22):
            count += handle.read(min(1 << 22, chunk.start - offset)).count(b"\n")
    return count


def _check_utf8(raw: bytes, chunk: Chunk) -> None:
    """Arrow's JSON reader keeps bad bytes and fails later, deep inside tokenisation: name the line and byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        number = _lines_before(chunk) + raw.count(b"\n", 0, err.start) + 1
        line = raw[line_start : raw.find(b"\n", err.start) if b"\n" in raw[err.start :] else len(raw)]
        at = err.start - line_start
        raise ValueError(
            f"corpus file {chunk.path} line {number}: byte {at} ({line[at : at + 1]!r}) is not UTF-8 "
            f"in {line[max(0, at - 20) : at + 20]!r}; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
