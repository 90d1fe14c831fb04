import pytest
from corpora import sentences, write_jsonl
from tiny_models import build_byte_tokenizer

from adept_ds import data as data_module
from adept_ds.data import load_blocks, pack_blocks, read_corpus, sample_order


def test_formats_read_alike(tmp_path):
    texts = sentences(20)
    write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    import datasets

    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    for source in ("a.jsonl", "a.txt", "a.parquet", "saved"):
        assert read_corpus(tmp_path / source)["text"] == texts, source


def test_packing_spans_long_documents_and_separates_with_eos():
    tokenizer = build_byte_tokenizer()
    import datasets

    corpus = datasets.Dataset.from_dict({"text": ["a" * 30, "b" * 17]})
    blocks = pack_blocks(corpus, tokenizer, 16)[:]["input_ids"]
    assert blocks.shape == (3, 16)  # 30 + EOS + 17 + EOS = 49 tokens -> 3 full blocks, 1 tail token dropped
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert blocks[1][13:16].tolist() == [a, tokenizer.eos_token_id, b]  # the document boundary at token 30


def test_cache_is_reused_and_keyed_by_block_size(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", sentences(50))
    tokenizer = build_byte_tokenizer()
    calls = []
    real = data_module.pack_blocks
    monkeypatch.setattr(data_module, "pack_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_blocks(corpus, tokenizer, 32, tmp_path / "cache")
    second = load_blocks(corpus, tokenizer, 32, tmp_path / "cache")
    assert len(calls) == 1 and (first[:]["input_ids"] == second[:]["input_ids"]).all()
    load_blocks(corpus, tokenizer, 16, tmp_path / "cache")
    assert len(calls) == 2
    write_jsonl(corpus, sentences(50, seed=9))  # new content, new fingerprint
    load_blocks(corpus, tokenizer, 32, tmp_path / "cache")
    assert len(calls) == 3


def test_sample_order_is_resumable_at_any_position():
    whole = sample_order(10, seed=3, start=0, count=35)
    assert sorted(whole[:10]) == list(range(10)) and whole[:10] != whole[10:20]  # a new shuffle per epoch
    for start in (0, 7, 10, 23):
        assert sample_order(10, seed=3, start=start, count=35 - start) == whole[start:]


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
        read_corpus(path)


def test_non_utf8_text_file_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"one\ntwo \xff three\n")
    with pytest.raises(ValueError, match=r"bad.txt line 2: byte 4 .* is not UTF-8"):
        read_corpus(path)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported corpus file .*x.csv"):
        read_corpus(tmp_path / "x.csv")
