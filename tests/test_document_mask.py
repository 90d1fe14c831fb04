"""The document mask (data.document_mask): a packed block scores exactly as its documents scored alone, in training's
loss, the probe and evaluation; off, every call is the one made before it existed. And the attention kernel choice."""

from __future__ import annotations

import pytest
import torch
from corpora import sentences, write_jsonl
from tiny_models import build_byte_tokenizer, tiny_config
from transformers import AutoModelForCausalLM

from adept_ds.data.blocks import IGNORE_INDEX, Batch, Packing, gather_batch, store_batch
from adept_ds.data.token_store import prepare_store
from adept_ds.evaluation.evaluate import corpus_loss
from adept_ds.model.attention import resolve_attention
from adept_ds.model.families import get_family
from adept_ds.model.lm_loss import use_chunked_loss
from adept_ds.probe.mask import mask_loss_sums, naive_mask_loss_sums

BLOCK = 48
MASK = Packing(document_mask=True, loss_on_document_start=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Short documents (5-33 bytes, a token each, and an EOS) packed into blocks of 48: several per block, many split."""
    root = tmp_path_factory.mktemp("documents")
    texts = [text[: 5 + 7 * (index % 5)] for index, text in enumerate(sentences(40, seed=11))]
    return prepare_store(write_jsonl(root / "c.jsonl", texts), root / "store", build_byte_tokenizer(), BLOCK, show_progress=False)


def tiny_model(attn_implementation: str = "sdpa", chunked: bool = False, family: str = "llama", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers=2, **config), attn_implementation=attn_implementation).float()
    model.config.use_cache = False  # as the trainer sets it
    if chunked:
        use_chunked_loss(model, get_family(family))
    return model


def documents(batch: Batch, row: int, keep_start: bool) -> list[torch.Tensor]:
    """The pieces of block `row` between position-id restarts; with `keep_start`, each piece followed by the next one's
    first token (what the piece's last token predicts in the block)."""
    ids, positions = batch.input_ids[row], batch.position_ids[row]
    starts = [*torch.nonzero(positions == 0).flatten().tolist(), len(ids)]
    return [ids[start : end + (keep_start and end < len(ids))] for start, end in zip(starts, starts[1:])]


def alone(model, pieces: list[torch.Tensor]) -> tuple[float, int]:
    """The token-weighted mean next-token loss of `pieces`, each scored on its own (positions 0.. as usual)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for piece in pieces:
            if len(piece) > 1:
                total += model(input_ids=piece[None], labels=piece[None]).loss.double() * (len(piece) - 1)
                count += len(piece) - 1
    return (total / count).item(), count


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("keep_start", [False, True], ids=["start_dropped", "start_kept"])
def test_a_packed_block_scores_as_its_documents_scored_alone(store, kernel, keep_start):
    packing = Packing(document_mask=True, loss_on_document_start=keep_start)
    batch = store_batch(store, range(4), packing)
    assert batch.position_ids.shape == batch.input_ids.shape and (batch.position_ids[:, 0] == 0).all()
    assert (batch.position_ids == 0).sum() > 2 * len(batch)  # several documents per block
    plain, chunked = tiny_model(kernel), tiny_model(kernel, chunked=True)
    for row in range(len(batch)):
        expected, count = alone(plain, documents(batch[row : row + 1], 0, keep_start))
        assert batch[row : row + 1].predicted == count
        with torch.no_grad():
            for model in (plain, chunked):  # HF's loss (train.chunked_loss: false) and adept_ds's chunked one
                packed = model(**batch[row : row + 1].model_inputs()).loss.item()
                assert packed == pytest.approx(expected, rel=1e-6, abs=0), (row, model is chunked)


@pytest.mark.parametrize(
    "family,window",
    [
        ("mistral", {"sliding_window": 8}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
        ("qwen3", {}),
    ],
    ids=["mistral_window8", "qwen2_window8", "qwen3"],
)
def test_every_family_scores_a_packed_block_as_its_documents_alone(store, family, window):
    """Each supported family builds the mask from position ids, a sliding window (narrower than the documents here)
    combined with it; llama is the tests above."""
    batch = store_batch(store, range(2), MASK)
    model = tiny_model(family=family, **window)
    pieces = [piece for row in range(2) for piece in documents(batch, row, False)]
    assert max(len(piece) for piece in pieces) > 8 or not window
    expected, _ = alone(model, pieces)
    with torch.no_grad():
        assert model(**batch.model_inputs()).loss.item() == pytest.approx(expected, rel=1e-6, abs=0)


def test_flex_attention_scores_a_packed_block_as_its_documents_alone(store):
    """flex attention builds its BlockMask from the same position ids (forward only: it has no backward on CPU, and
    compiling its kernel here costs about 15 s, once for the batch's shape)."""
    batch = store_batch(store, range(2), MASK)
    expected, count = alone(tiny_model(), [piece for row in range(2) for piece in documents(batch, row, False)])
    assert batch.predicted == count
    with torch.no_grad():
        packed = tiny_model("flex_attention")(**batch.model_inputs()).loss.item()
    assert packed == pytest.approx(expected, rel=1e-6, abs=0)


def test_a_packed_blocks_gradient_is_its_documents_gradient(store):
    """What training steps on: the gradient of the packed loss (chunked, as the trainer computes it) equals the
    token-weighted gradient of the documents' losses, each document scored alone."""
    batch = store_batch(store, [3], MASK)
    model = tiny_model(chunked=True)
    model(**batch.model_inputs()).loss.backward()
    packed = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    pieces = [piece for piece in documents(batch, 0, False) if len(piece) > 1]
    for piece in pieces:  # sum over documents of (their tokens / all tokens) x d(their mean loss)
        (model(input_ids=piece[None], labels=piece[None]).loss * (len(piece) - 1) / batch.predicted).backward()
    assert len(pieces) >= 2 and packed["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    for name, param in model.named_parameters():  # fp32 sums in another order: the error scales with the tensor's largest
        # entry, not each entry's (CI's CPU missed atol=1e-8 on an embedding row near 0). Here it is ~3e-7 of the largest;
        # attention across documents (position_ids dropped) puts it at ~1.1 times the largest.
        scale = packed[name].abs().max().item()
        torch.testing.assert_close(param.grad, packed[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_a_document_split_across_blocks_starts_again_at_position_0(store):
    starts = set(store.doc_starts.tolist())
    split = next(block for block in range(1, len(store)) if block * BLOCK not in starts)  # begins inside a document
    positions = store.positions(split)
    assert positions[0] == 0 and store.positions(split - 1)[-1] > 0
    first_start = next(offset for offset in range(1, BLOCK) if split * BLOCK + offset in starts)
    assert positions[:first_start].tolist() == list(range(first_start)) and positions[first_start] == 0


def test_with_the_mask_off_every_call_is_the_plain_one_bit_for_bit(store):
    pairs = [(0, 3), (0, 1)]
    batch = gather_batch([store], pairs)
    assert set(batch.model_inputs()) == {"input_ids", "labels"} and batch.labels is batch.input_ids
    assert batch.predicted == 2 * (BLOCK - 1)
    blocks = store[[3, 1]]
    for chunked in (False, True):
        model = tiny_model(chunked=chunked)
        with torch.no_grad():
            assert torch.equal(model(**batch.model_inputs()).loss, model(input_ids=blocks, labels=blocks).loss)
    model = tiny_model()
    assert corpus_loss(model, batch, batch_size=1) == corpus_loss(model, blocks, batch_size=1)


def test_dropping_document_starts_without_the_mask_drops_only_those_labels(store):
    batch = gather_batch([store], [(0, 2)], Packing(loss_on_document_start=False))
    assert batch.position_ids is None and set(batch.model_inputs()) == {"input_ids", "labels"}
    dropped = batch.labels[0] == IGNORE_INDEX
    assert dropped.tolist() == [index > 0 and position == 0 for index, position in enumerate(store.positions(2).tolist())]


def test_one_row_for_flash_attention_scores_as_the_rows(store):
    """flash-attention 2 reads document boundaries from position ids only in a batch of one row: its layout, on sdpa."""
    for keep_start in (False, True):
        rows = store_batch(store, [5, 2, 7], Packing(document_mask=True, loss_on_document_start=keep_start))
        one = store_batch(store, [5, 2, 7], Packing(document_mask=True, loss_on_document_start=keep_start, one_row=True))
        assert one.model_inputs()["input_ids"].shape == (1, 3 * BLOCK) and one.predicted == rows.predicted
        model = tiny_model(chunked=True)
        with torch.no_grad():
            assert model(**one.model_inputs()).loss.item() == pytest.approx(model(**rows.model_inputs()).loss.item(), rel=1e-6)


def test_the_probe_and_evaluation_score_documents_alone_with_the_mask(store):
    family, model = get_family("llama"), tiny_model().eval()
    batch = store_batch(store, range(3), MASK)
    expected, count = alone(model, [piece for row in range(3) for piece in documents(batch, row, False)])
    assert corpus_loss(model, batch, batch_size=2) == pytest.approx(expected, rel=1e-6)
    sums, _ = mask_loss_sums(family, model, batch)
    assert (sums[0] / count).item() == pytest.approx(expected, rel=1e-6)  # the base pass
    torch.testing.assert_close(sums, naive_mask_loss_sums(family, model, batch), rtol=1e-6, atol=0)  # and each bypass


def test_the_packing_defaults_are_the_run_configs():
    from adept_ds.cli import build_parser
    from adept_ds.run.config import DataConfig

    probe = build_parser().parse_args(["probe", "--data", "d", "--output", "o"])
    defaults = (DataConfig().document_mask, DataConfig().loss_on_document_start)
    assert defaults == (Packing().document_mask, Packing().loss_on_document_start) == (probe.document_mask, probe.loss_on_document_start)


@pytest.mark.parametrize(
    "requested,gpu,half,flash,expected",
    [
        ("auto", False, False, True, ("sdpa", "model.attn_implementation=auto: on CPU")),
        ("auto", True, True, True, ("flash_attention_2", "model.attn_implementation=auto: a GPU, bf16 or fp16, and flash-attn installed")),
        (
            "auto",
            True,
            True,
            False,
            ("sdpa", "model.attn_implementation=auto: the flash-attn package is not installed (2.3.3 or later, with CUDA)"),
        ),
        ("auto", True, False, True, ("sdpa", "model.attn_implementation=auto: flash_attention_2 needs bf16 or fp16, and this run is fp32")),
        ("eager", False, False, False, ("eager", "model.attn_implementation=eager")),
        ("flex_attention", True, True, False, ("flex_attention", "model.attn_implementation=flex_attention")),
        ("flash_attention_2", False, True, True, "model.attn_implementation=flash_attention_2 needs a GPU; on CPU take sdpa"),
        ("flash_attention_2", True, False, True, "model.attn_implementation=flash_attention_2 needs bf16 or fp16"),
        (
            "flash_attention_2",
            True,
            True,
            False,
            r"the flash-attn package is not installed \(2.3.3 or later, with CUDA\): pip install flash-attn",
        ),
        ("flex_attention", False, False, False, "torch's FlexAttention has no backward on CPU"),
    ],
)
def test_the_attention_kernel_is_chosen_or_refused_with_the_reason(monkeypatch, requested, gpu, half, flash, expected):
    missing = None if flash else "the flash-attn package is not installed (2.3.3 or later, with CUDA)"
    monkeypatch.setattr("adept_ds.model.attention.flash_attention_missing", lambda: missing)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            resolve_attention(requested, gpu, half)
        return
    kernel, why = resolve_attention(requested, gpu, half)
    assert (kernel, why.split(" (pip")[0]) == expected


@pytest.mark.dist
def test_on_two_zero3_ranks_a_packed_block_scores_as_its_documents_alone(tmp_path):
    """The same equality through the training engine, DeepSpeed ZeRO-3 on 2 real CPU ranks, after a step whose
    importance pass, validations and update all ran with the mask."""
    from distributed import read_rank_results, run_deepspeed
    from train_setup import make_training_inputs, overrides

    inputs = make_training_inputs(tmp_path)
    settings = {"data.document_mask": True, "data.loss_on_document_start": False, "train.max_steps": 1, "train.save_interval": 0}
    settings.update({"importance.interval": 1, "importance.batches": 1, "eval.interval": 1, "train.export": False})
    settings.update({"scheduler.type": "constant", "scheduler.warmup_steps": 0})  # the step moves the weights
    result = run_deepspeed("document_mask_run.py", tmp_path, *overrides(inputs, tmp_path / "run", **settings))
    assert "attention: sdpa (model.attn_implementation=auto: on CPU); data.document_mask on" in result.stdout
    for rank in read_rank_results(tmp_path, 2):
        assert len(rank["losses"]) == 1 and [v["step"] for v in rank["validations"]] == [0, 1]
        assert rank["validations"][1]["domain"] != rank["validations"][0]["domain"]  # the step changed the model
        assert len(rank["blocks"]) == 2
        for block in rank["blocks"]:
            assert block["documents"] >= 2 and block["packed"] == pytest.approx(block["alone"], rel=1e-6, abs=0), block


def test_probe_and_eval_commands_take_the_mask_flags(tmp_path):
    """README: `adept-ds probe ... --document-mask --no-loss-on-document-start` and `adept-ds eval ...` with the same
    flags, through the console script: each scores as its function does with the mask, and not as without it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from distributed import cpu_env
    from tiny_models import make_tiny_model

    from adept_ds.evaluation.evaluate import evaluate_model
    from adept_ds.probe.layers import probe_model

    model = make_tiny_model(tmp_path / "model", num_layers=2)
    texts = [text[: 5 + 7 * (index % 5)] for index, text in enumerate(sentences(40, seed=11))]
    corpus = write_jsonl(tmp_path / "general.jsonl", texts)
    script, flags = Path(sys.executable).parent / "adept-ds", ["--document-mask", "--no-loss-on-document-start", "--block-size", str(BLOCK)]

    def run(*args):
        done = subprocess.run([str(script), *map(str, args), *flags], capture_output=True, text=True, env=cpu_env(), cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    run("eval", "--model", model, "--general", corpus, "--max-blocks", 3, "--output", tmp_path / "eval.json")
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    masked, plain = (evaluate_model(model, {"general": corpus}, block_size=BLOCK, max_blocks=3, packing=p) for p in (MASK, Packing()))
    assert evaluated["document_mask"] is True and evaluated["loss_on_document_start"] is False
    assert evaluated["perplexity"]["general"]["loss"] == pytest.approx(masked["perplexity"]["general"]["loss"], rel=1e-6)
    assert evaluated["perplexity"]["general"]["loss"] != pytest.approx(plain["perplexity"]["general"]["loss"], rel=1e-3)

    run("probe", "--model", model, "--data", corpus, "--max-tokens", 3 * BLOCK, "--output", tmp_path / "probe.json")
    probed = json.loads((tmp_path / "probe.json").read_text())
    direct = probe_model(model, corpus, tmp_path / "direct.json", max_tokens=3 * BLOCK, block_size=BLOCK, show_progress=False, packing=MASK)
    assert probed["document_mask"] is True and probed["loss_on_document_start"] is False
    assert probed["scores"] == pytest.approx(direct["scores"], rel=1e-6)
