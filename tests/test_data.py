"""The data layer: corpus reading, token stores (prepare, open, refuse), the sampler and mixtures."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import sentences, write_jsonl
from tiny_models import build_byte_tokenizer

from adept_ds.data import corpus as corpus_module
from adept_ds.data import token_store
from adept_ds.data.blocks import load_blocks
from adept_ds.data.corpus import read_documents
from adept_ds.data.sampler import EpochPermutation, Mixture, sample_order
from adept_ds.data.token_store import open_store, prepare_store
from adept_ds.run.config import load_run_config
from adept_ds.runtime import file_lock


def tokenizer_ids(tokenizer, texts: list[str]) -> list[int]:
    """The tokenizer's own ids of a corpus, EOS after each document: what a store must hold."""
    return [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]


def document_starts(tokenizer, texts: list[str]) -> list[int]:
    """Where each non-empty document starts in the packed stream of `tokenizer_ids`."""
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in texts if text]
    return [sum(lengths[:index]) for index in range(len(lengths))]


def positions_by_hand(starts: list[int], block: int, size: int) -> list[int]:
    """A block's position ids, token by token: 0 at its first token and at each document start, else one more."""
    inside = set(starts)
    positions = []
    for offset in range(size):
        positions.append(0 if offset == 0 or block * size + offset in inside else positions[-1] + 1)
    return positions


def test_formats_read_alike(tmp_path):
    texts = sentences(20)
    write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "array.json").write_text(json.dumps([{"text": t} for t in texts]))
    import datasets

    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    for source in ("a.jsonl", "a.txt", "array.json", "a.parquet", "saved"):
        assert read_documents(tmp_path / source) == texts, source


def test_packing_spans_long_documents_and_separates_with_eos(tmp_path):
    tokenizer = build_byte_tokenizer()
    corpus = write_jsonl(tmp_path / "c.jsonl", ["a" * 30, "", "b" * 17])
    store = prepare_store(corpus, tmp_path / "store", tokenizer, 16, show_progress=False)
    blocks = store[:]
    assert blocks.shape == (3, 16)  # 30 + EOS + 17 + EOS = 49 tokens -> 3 full blocks, 1 tail token dropped
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert blocks[1][13:16].tolist() == [a, tokenizer.eos_token_id, b]  # the document boundary at token 30
    assert store.manifest["num_documents"] == 2  # the empty one holds no tokens


@pytest.mark.parametrize("workers", [1, 2])
def test_store_round_trips_the_tokenizers_ids_across_many_chunks(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 3000)  # many chunks, so order across workers matters
    tokenizer = build_byte_tokenizer()
    texts = sentences(400, seed=5)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    store = prepare_store(corpus, tmp_path / "store", tokenizer, 64, num_workers=workers, show_progress=False)
    ids = tokenizer_ids(tokenizer, texts)
    usable = len(ids) // 64 * 64
    assert store.manifest["dtype"] == "uint16" and store.tokens.dtype == np.uint16
    assert np.asarray(store.tokens).tolist() == ids[:usable]
    assert store[[3, 0]].tolist() == [ids[3 * 64 : 4 * 64], ids[:64]]
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    import hashlib

    assert manifest["sources"] == [
        {"path": str(corpus), "size": corpus.stat().st_size, "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}
    ]
    assert (manifest["num_tokens"], manifest["num_blocks"], manifest["block_size"]) == (usable, usable // 64, 64)
    assert manifest["tokenizer_fingerprint"] == token_store.tokenizer_fingerprint(tokenizer)
    assert (tmp_path / "store" / "tokens.bin").stat().st_size == 2 * usable
    assert not list(tmp_path.glob(".store*")) and not (tmp_path / "store.lock").exists()  # no staging or lock left
    # Document boundaries: offsets into the whole stream, whichever chunk and worker tokenised them.
    starts = [start for start in document_starts(tokenizer, texts) if start < usable]
    assert manifest["format"] == "adept_ds.token_store/2" and np.asarray(store.doc_starts).tolist() == starts
    assert manifest["num_doc_starts"] == len(starts) and manifest["num_documents"] == len(texts)
    for block in range(len(store)):
        assert store.positions(block).tolist() == positions_by_hand(starts, block, 64), block


def test_a_large_vocabulary_is_stored_as_uint32():
    assert token_store.token_dtype(65536) == np.uint16 and token_store.token_dtype(65537) == np.uint32


def test_a_token_budget_prepares_only_a_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 2000)
    tokenizer = build_byte_tokenizer()
    texts = sentences(600, seed=3)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    store = load_blocks(corpus, tokenizer, 32, tmp_path / "cache", max_tokens=1000)
    assert len(store) == 31 and not store.manifest["complete"] and store.manifest["sources"][0]["sha256"] is None
    assert store.manifest["tokens_read"] == 31 * 32
    assert np.asarray(store.tokens).tolist() == tokenizer_ids(tokenizer, texts)[: 31 * 32]
    assert np.asarray(store.doc_starts).tolist() == [start for start in document_starts(tokenizer, texts) if start < 31 * 32]


def test_raw_corpus_cache_is_reused_and_keyed_by_block_size_and_content(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(50))
    tokenizer = build_byte_tokenizer()
    calls = []
    real = token_store.prepare_store
    monkeypatch.setattr("adept_ds.data.blocks.prepare_store", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_blocks(corpus, tokenizer, 32, tmp_path / "cache")
    second = load_blocks(corpus, tokenizer, 32, tmp_path / "cache")
    assert len(calls) == 1 and (first[:] == second[:]).all()
    load_blocks(corpus, tokenizer, 16, tmp_path / "cache")
    assert len(calls) == 2
    write_jsonl(corpus, sentences(50, seed=9))  # new content: new size and mtime, new key
    changed = load_blocks(corpus, tokenizer, 32, tmp_path / "cache")
    assert changed[:].shape != first[:].shape or (changed[:] != first[:]).any()
    assert len(calls) == 3


def test_a_prepared_store_opens_without_its_sources(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(80))
    tokenizer = build_byte_tokenizer()
    prepared = prepare_store(corpus, tmp_path / "store", tokenizer, 32, show_progress=False)
    corpus.unlink()  # startup reads the manifest and a file size, nothing of the corpus
    store = load_blocks(tmp_path / "store", tokenizer, 32, tmp_path / "cache", vocab_size=260)
    assert (store[:] == prepared[:]).all() and not (tmp_path / "cache").exists()


def test_a_store_is_refused_for_another_tokenizer_block_size_or_vocabulary(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(80))
    tokenizer = build_byte_tokenizer()
    prepare_store(corpus, tmp_path / "store", tokenizer, 32, show_progress=False)
    with pytest.raises(ValueError, match=r"packed in blocks of 32 tokens, but the run uses 64"):
        load_blocks(tmp_path / "store", tokenizer, 64, tmp_path / "cache")
    other = build_byte_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"tokenised with another tokenizer \(fingerprint \w+, this model's is \w+\)"):
        load_blocks(tmp_path / "store", other, 32, tmp_path / "cache")
    max_id = open_store(tmp_path / "store").manifest["max_token_id"]
    with pytest.raises(ValueError, match=rf"holds token id {max_id}, but the model's vocabulary has {max_id} ids"):
        load_blocks(tmp_path / "store", tokenizer, 32, tmp_path / "cache", vocab_size=max_id)


def test_a_truncated_store_names_expected_and_actual_sizes(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(80))
    store = prepare_store(corpus, tmp_path / "store", build_byte_tokenizer(), 32, show_progress=False)
    expected = store.manifest["num_tokens"] * 2
    with open(tmp_path / "store" / "tokens.bin", "r+b") as handle:
        handle.truncate(expected - 10)
    with pytest.raises(ValueError, match=rf"tokens.bin has {expected - 10} bytes, the manifest promises {expected}"):
        open_store(tmp_path / "store")
    with open(tmp_path / "store" / "tokens.bin", "r+b") as handle:
        handle.truncate(expected)
    expected = store.manifest["num_doc_starts"] * 8
    (tmp_path / "store" / "doc_starts.bin").write_bytes(b"\0" * (expected - 8))
    with pytest.raises(ValueError, match=rf"doc_starts.bin has {expected - 8} bytes, the manifest promises {expected}"):
        open_store(tmp_path / "store")


def test_a_format_1_store_still_opens_and_is_refused_only_where_document_boundaries_are_needed(tmp_path):
    from adept_ds.data.blocks import Packing, gather_batch

    tokenizer = build_byte_tokenizer()
    store = prepare_store(write_jsonl(tmp_path / "c.jsonl", sentences(80)), tmp_path / "store", tokenizer, 32, show_progress=False)
    manifest = {**store.manifest, "format": "adept_ds.token_store/1"}  # what adept_ds wrote before document boundaries
    del manifest["num_doc_starts"]
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "store" / "doc_starts.bin").unlink()
    old = load_blocks(tmp_path / "store", tokenizer, 32, tmp_path / "cache")
    assert old.doc_starts is None and torch.equal(gather_batch([old], [(0, 2)]).input_ids, store[[2]])
    for setting in ("data.document_mask", "data.loss_on_document_start=false"):
        with pytest.raises(ValueError, match=rf"format 'adept_ds.token_store/1', which records no document boundaries; {setting} needs"):
            load_blocks(tmp_path / "store", tokenizer, 32, tmp_path / "cache", documents=setting)
    with pytest.raises(ValueError, match="records no document boundaries"):
        gather_batch([old], [(0, 2)], Packing(document_mask=True))


def test_a_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 200)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n' * 50 + '{"body": "no text"}\n' * 20)  # the bad records fill the last chunks
    with pytest.raises(ValueError, match="has no text field 'text'"):
        prepare_store(corpus, tmp_path / "store", build_byte_tokenizer(), 8, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "store.error"]  # no store, staging dir or lock
    assert "has no text field 'text'" in (tmp_path / "store.error").read_text()  # for processes that waited on it
    corpus.write_text('{"text": "fine"}\n' * 50)
    assert len(prepare_store(corpus, tmp_path / "store", build_byte_tokenizer(), 8, show_progress=False)) > 0
    assert not (tmp_path / "store.error").exists()  # an older error never blocks a new attempt


PREPARE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from tiny_models import build_byte_tokenizer
    from adept_ds.data.token_store import prepare_store
    # Ordered by files, not by timing: the first prepares once the second has imported everything, and the
    # second asks for the store once the first holds the lock.
    ready, lock = Path({output!r} + ".second-ready"), Path({output!r} + ".lock")
    if sys.argv[1:] == ["second"]:
        ready.touch()
    deadline = time.monotonic() + 120  # a broken test must not leave this process behind
    while not (lock.exists() if sys.argv[1:] == ["second"] else ready.exists()):
        assert time.monotonic() < deadline, "the other process never came"
        time.sleep(0.005)
    store = prepare_store({corpus!r}, {output!r}, build_byte_tokenizer(), 32, num_workers=1, show_progress=False)
    print("blocks", len(store), "prepared by", store.manifest["created_by"])
    """
)


def test_two_processes_preparing_one_store_do_not_corrupt_it(tmp_path):
    """As two nodes on a shared filesystem would: one prepares, the other waits and reuses its store."""
    from pathlib import Path

    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(6000, seed=4))
    script = PREPARE.format(tests=str(Path(__file__).parent), corpus=str(corpus), output=str(tmp_path / "store"))
    processes = [subprocess.Popen([sys.executable, "-c", script, role], stdout=subprocess.PIPE, text=True) for role in ("first", "second")]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "waiting for" not in outputs[0] and "waiting for" in outputs[1], outputs  # the second waited for the first
    assert len({out.splitlines()[-1] for out in outputs}) == 1  # both report the same store, by the same preparer
    store = open_store(tmp_path / "store")
    assert (
        np.asarray(store.tokens).tolist() == tokenizer_ids(build_byte_tokenizer(), sentences(6000, seed=4))[: store.manifest["num_tokens"]]
    )


def test_processes_that_waited_for_a_failed_prepare_report_its_error(tmp_path):
    """Not N preparations of a bad corpus one after the other: the waiters raise the error the preparer found."""
    from pathlib import Path

    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(6000, seed=4))
    with open(corpus, "ab") as handle:
        handle.write(b'{"text": "caf\xe9"}\n')  # latin-1, at the very end
    script = PREPARE.format(tests=str(Path(__file__).parent), corpus=str(corpus), output=str(tmp_path / "store"))
    processes = [
        subprocess.Popen([sys.executable, "-c", script, role], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for role in ("first", "second")
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [1, 1]
    assert all("line 6001: byte 13" in err and "is not UTF-8" in err for _, err in outputs), outputs
    assert "waiting for" in outputs[1][0] and "found by" in outputs[1][1]  # the waiter names who found it
    assert not (tmp_path / "store").exists()


def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(40))
    lock = tmp_path / "store.lock"
    lock.write_text("deadhost pid 1\n")
    old = time.time() - file_lock.STALE_S - 5
    import os

    os.utime(lock, (old, old))
    store = prepare_store(corpus, tmp_path / "store", build_byte_tokenizer(), 32, show_progress=False)
    assert len(store) > 0 and not lock.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b'{"body": "x"}\n', "has no text field 'text'"),
        (b'{"text": 5}\n', "not text"),
        (b"{not json\n", "cannot read corpus"),
        (b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n', r"bad.jsonl line 2: byte 13 \(b'\\xe9'\) is not UTF-8"),
    ],
)
def test_bad_corpora(tmp_path, content, message):
    """Each names the file and what is wrong; non-UTF-8 bytes would otherwise pass Arrow's JSON reader and
    fail later inside tokenisation."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_documents(path)


def test_non_utf8_text_file_names_the_line_in_a_later_chunk(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"one\n" * 3000 + b"two \xff three\n")
    chunks = corpus_module.plan_chunks(path, chunk_bytes=1000)
    assert len(chunks) > 10
    with pytest.raises(ValueError, match=r"bad.txt line 3001: byte 4 .* is not UTF-8"):
        for chunk in chunks:
            corpus_module.read_chunk(chunk, "text")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported corpus file .*x.csv: use one of .json, .jsonl, .parquet, .text, .txt \(.jsonl.gz"):
        read_documents(tmp_path / "x.csv")


def write_compressed(path, raw: bytes):
    import gzip

    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else zstandard.ZstdCompressor().compress(raw))
    return path


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_compressed_corpus_prepares_the_same_store_block_for_block_streamed_in_pieces(tmp_path, monkeypatch, suffix):
    """gzip and zstd JSONL are read as streams, cut into pieces that each end at a line break (many here), and pack
    into exactly the store of the uncompressed file; no decompressed copy is written anywhere."""
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 3000)
    tokenizer = build_byte_tokenizer()
    plain = write_jsonl(tmp_path / "plain" / "domain.jsonl", sentences(600, seed=3))
    packed = write_compressed(tmp_path / "packed" / f"domain.jsonl{suffix}", plain.read_bytes())
    pieces = list(corpus_module.pieces(corpus_module.plan_chunks(packed)))
    assert len(pieces) > 10 and all(piece.data.endswith(b"\n") for piece in pieces)
    assert b"".join(piece.data for piece in pieces) == plain.read_bytes()
    a = prepare_store(plain, tmp_path / "a", tokenizer, 64, num_workers=2, show_progress=False)
    b = prepare_store(packed, tmp_path / "b", tokenizer, 64, num_workers=2, show_progress=False)
    assert len(a) == len(b) > 20 and np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == [packed.name]  # nothing decompressed beside it


def test_compressed_text_and_json_arrays_and_damaged_files(tmp_path):
    texts = sentences(50)
    assert read_documents(write_compressed(tmp_path / "a.txt.gz", ("\n".join(texts) + "\n").encode())) == texts
    assert read_documents(write_compressed(tmp_path / "a.json.zst", json.dumps([{"text": t} for t in texts]).encode())) == texts
    raw = write_jsonl(tmp_path / "x.jsonl", texts).read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(write_compressed(tmp_path / "y.jsonl.gz", raw).read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot decompress corpus file .*cut.jsonl.gz \(gzip\)"):
        read_documents(tmp_path / "cut.jsonl.gz")
    bad = write_compressed(tmp_path / "bad.jsonl.zst", raw + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"bad.jsonl.zst line {len(texts) + 1}: byte 13 .* is not UTF-8"):
        read_documents(bad)


def test_a_directory_of_several_formats_reads_each_file_with_its_own_reader(tmp_path):
    import datasets

    texts = sentences(30)
    write_jsonl(tmp_path / "corpus" / "a.jsonl", texts[:10])
    datasets.Dataset.from_dict({"text": texts[10:20]}).to_parquet(str(tmp_path / "corpus" / "b.parquet"))
    write_compressed(tmp_path / "corpus" / "c.txt.gz", ("\n".join(texts[20:]) + "\n").encode())
    (tmp_path / "corpus" / "README.md").write_text("not a corpus file: ignored")
    assert read_documents(tmp_path / "corpus") == texts  # files in name order, each by its own format


def test_a_mixture_source_names_its_own_text_field(tmp_path):
    config = load_run_config(None, ["data.text_field=body", "data.domain=[{path: d.jsonl.gz}, {path: g.parquet, text_field: content}]"])
    assert [(s.name, s.text_field) for s in config.data.domain_sources()] == [("d", "body"), ("g", "content")]
    with pytest.raises(ValueError, match=r"data.domain\[0\].text_field=5: need a field name"):
        load_run_config(None, ["data.domain=[{path: d.jsonl, text_field: 5}]"])


# -- sampler ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 31, 64, 97, 1000, 1024, 1025, 65521, 100003])
def test_each_epoch_is_a_permutation(n):
    for epoch in range(3):
        order = sample_order(n, seed=11, start=epoch * n, count=n)
        assert np.array_equal(np.sort(order), np.arange(n)), (n, epoch)
    if n >= 64:  # a shuffle, and a different one each epoch
        first, second = sample_order(n, 11, 0, n), sample_order(n, 11, n, n)
        assert not np.array_equal(first, np.arange(n)) and not np.array_equal(first, second)


def test_sample_order_resumes_mid_epoch_at_any_position():
    whole = sample_order(10, seed=3, start=0, count=35)
    for start in (0, 7, 10, 23):
        assert sample_order(10, seed=3, start=start, count=35 - start).tolist() == whole[start:].tolist()
    big = 10**10  # no index list of this size exists anywhere
    assert sample_order(big, 5, 123456789, 64).tolist() == EpochPermutation(big, 5, 0)(np.arange(123456789, 123456789 + 64)).tolist()
    assert sample_order(big, 5, big + 3, 2).tolist() == EpochPermutation(big, 5, 1)(np.arange(3, 5)).tolist()


def test_mixture_proportions_and_exact_resume():
    mixture = Mixture([1000, 300, 50], [0.6, 0.3, 0.1], seed=2)
    pairs, counts = mixture.draw([0, 0, 0], 5000)
    assert counts == [3000, 1500, 500]
    for prefix in (17, 333, 4001):
        _, partial = mixture.draw([0, 0, 0], prefix)
        assert all(abs(c - w * prefix) <= 1 for c, w in zip(partial, mixture.weights)), (prefix, partial)
        rest, after = mixture.draw(partial, 5000 - prefix)
        assert pairs[:prefix] + rest == pairs and after == counts
    for source, size in enumerate([1000, 300, 50]):  # each source walks its own permutation stream
        blocks = [block for s, block in pairs if s == source]
        assert blocks == sample_order(size, mixture.seeds[source], 0, len(blocks)).tolist()
    single = Mixture([77], [1.0], seed=4)
    assert [b for _, b in single.draw([5], 9)[0]] == sample_order(77, 4, 5, 9).tolist()  # one source: the plain stream


@pytest.mark.parametrize(
    "domain,message",
    [
        ([{"path": "a", "weight": -1}, {"path": "b", "weight": 1}], r"mixture weight -1: weights must be finite numbers >= 0"),
        ([{"path": "a", "weight": 0}, {"path": "b", "weight": 0}], r"are all zero"),
        ([{"path": "a", "weight": "x"}], r"mixture weight 'x'"),
        ([{"file": "a"}], r"data.domain\[0\]=\{'file': 'a'\}: a source is a path or a mapping"),
        (["x/a.jsonl", "y/a.jsonl"], r"source names \['a', 'a'\] repeat"),
    ],
)
def test_bad_mixtures_are_refused(domain, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, [f"data.domain={json.dumps(domain)}"])


def test_a_mixture_config_lists_its_sources(tmp_path):
    config = load_run_config(None, ["data.domain=[{path: d.jsonl, weight: 3}, {path: g.jsonl, weight: 1, name: replay}]"])
    assert [(s.name, Path(s.path).name, s.weight) for s in config.data.domain_sources()] == [("d", "d.jsonl", 3), ("replay", "g.jsonl", 1)]
    assert list(config.corpora())[:2] == ["domain:d", "domain:replay"]


def test_prepare_data_command(tmp_path, capsys):
    from tiny_models import make_tiny_model

    from adept_ds.cli import main

    model = make_tiny_model(tmp_path / "model", "llama", num_layers=2)
    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(300))
    args = ["prepare-data", "--model", str(model), "--data", str(corpus), "--output", str(tmp_path / "store"), "--block-size", "32"]
    assert main([*args, "--workers", "2"]) == 0
    assert "prepared " in capsys.readouterr().out
    store = open_store(tmp_path / "store")
    assert store.manifest["workers"] == 2 and len(store) * 32 == store.manifest["num_tokens"]
    assert main(args) == 0 and "already a token store" in capsys.readouterr().out  # nothing redone
    assert main([*args[:-1], "64"]) == 2  # the existing store's block size differs: refused, not overwritten
    assert "packed in blocks of 32 tokens, but the run uses 64" in capsys.readouterr().err
    assert main([*args[:5], "--output", str(tmp_path / "other"), "--workers", "0"]) == 2
    assert "--workers 0: need at least 1 worker process" in capsys.readouterr().err
