"""Self-replay (issue 31): make-probe-corpus's provenance manifest, the cached generator for programs, and the
checks that a `self_generated: true` source was sampled from the run's base model (check, train)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from corpora import sentences, write_jsonl
from distributed import cpu_env
from tiny_models import make_tiny_model

import adept_ds.probe.corpus as probe_corpus
from adept_ds.cli import main as cli_main
from adept_ds.data.self_replay import (
    MANIFEST_FORMAT,
    base_fingerprint,
    cached_corpus,
    check_self_generated,
    manifest_path,
    sampling_settings,
)
from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
from adept_ds.model.expand import expand_checkpoint
from adept_ds.probe.corpus import make_probe_corpus, self_generated_corpus
from adept_ds.run.config import DataConfig

# A few generate calls of a 2-layer model: 4 documents of at most 8 tokens a batch.
SIZES = {"batch_size": 4, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model A, model B (other weights, same shape), and A expanded (the run model whose base is A)."""
    root = tmp_path_factory.mktemp("self_replay")
    a = make_tiny_model(root / "a", num_layers=2, seed=0)
    b = make_tiny_model(root / "b", num_layers=2, seed=1)
    expand_checkpoint(a, root / "a_expanded", [1], show_progress=False)
    return {"a": a, "b": b, "a_expanded": root / "a_expanded"}


@pytest.fixture(scope="module")
def replay(models, tmp_path_factory):
    """Self-replay text sampled from model A by make-probe-corpus."""
    path = tmp_path_factory.mktemp("replay") / "replay.jsonl"
    return path, make_probe_corpus(models["a"], path, 40, seed=5, temperature=0.9, top_p=0.8, show_progress=False, **SIZES)


def test_make_probe_corpus_writes_a_manifest_naming_the_model_and_the_settings(models, replay):
    path, stats = replay
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest_path(path) == path.parent / "replay.jsonl.manifest.json"
    assert manifest == {
        "format": MANIFEST_FORMAT,
        "model": str(models["a"].absolute()),
        "model_fingerprint": fingerprint_checkpoint(open_checkpoint(models["a"])),
        "tokens": 40,
        "seed": 5,
        "temperature": 0.9,
        "top_p": 0.8,
        "max_new_tokens": 8,
        "batch_size": 4,
        "documents": stats["documents"],
        "generated_tokens": stats["tokens"],
        "bytes": path.stat().st_size,
    }
    assert len(path.read_text().splitlines()) == stats["documents"]
    assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]  # both written through a temp file


def test_the_cache_reuses_a_corpus_of_the_same_model_and_settings_and_generates_any_other(models, tmp_path, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return make_probe_corpus(*args, **{**kwargs, "show_progress": False})

    monkeypatch.setattr(probe_corpus, "make_probe_corpus", counted)
    first = self_generated_corpus(models["a"], 20, tmp_path, **SIZES)
    assert first.parent == tmp_path and first.name.startswith("self_generated_") and first.suffix == ".jsonl"
    assert len(calls) == 1 and manifest_path(first).is_file()
    before = first.stat().st_mtime_ns
    assert self_generated_corpus(models["a"], 20, tmp_path, temperature=1, **SIZES) == first  # 1 and 1.0: one key
    assert len(calls) == 1 and first.stat().st_mtime_ns == before
    others = [
        self_generated_corpus(models["a"], 20, tmp_path, seed=1, **SIZES),
        self_generated_corpus(models["a"], 24, tmp_path, **SIZES),
        self_generated_corpus(models["b"], 20, tmp_path, **SIZES),
    ]
    assert len(calls) == 4 and len({first, *others}) == 4
    assert json.loads(manifest_path(others[2]).read_text())["model_fingerprint"] == base_fingerprint(models["b"])
    # A file changed after it was written no longer matches its manifest: not reused (and refused by check).
    settings = sampling_settings(20, 0, 1.0, 0.95, **SIZES)
    assert cached_corpus(tmp_path, base_fingerprint(models["a"]), settings) == (first, True)
    with open(first, "a") as handle:
        handle.write('{"text": "edited"}\n')
    assert cached_corpus(tmp_path, base_fingerprint(models["a"]), settings) == (first, False)
    with pytest.raises(ValueError, match=r"the file changed after make-probe-corpus wrote it"):
        check_self_generated(first, base_fingerprint(models["a"]))
    with pytest.raises(ValueError, match=r"is an expanded model: sample self-replay text from the model it was expanded from, .*/a$"):
        self_generated_corpus(models["a_expanded"], 20, tmp_path, **SIZES)


def test_a_corpus_without_provenance_or_from_another_model_is_refused_in_one_line(models, replay, tmp_path):
    path, _ = replay
    base_a, base_b = base_fingerprint(models["a"]), base_fingerprint(models["b"])
    assert check_self_generated(path, base_a).startswith(f"{path}: sampled from {models['a'].absolute()} (fingerprint {base_a}")

    plain = write_jsonl(tmp_path / "plain.jsonl", sentences(4))
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_bytes(path.read_bytes())
    manifest_path(foreign).write_text(json.dumps({**json.loads(manifest_path(path).read_text()), "format": "other/1"}))
    cases = [
        (
            plain,
            base_a,
            f"{plain} has no manifest {plain}.manifest.json: it was not written by adept-ds make-probe-corpus; "
            f"generate it with `adept-ds make-probe-corpus --model BASE --tokens N --output {plain}`",
        ),
        (foreign, base_a, f"format 'other/1', expected '{MANIFEST_FORMAT}': not a manifest of adept-ds make-probe-corpus"),
        (
            path,
            base_b,
            f"{path} was sampled from {models['a'].absolute()} (fingerprint {base_a}), not from this run's base "
            f"model (fingerprint {base_b})",
        ),
        (tmp_path, base_a, "is a directory: self_generated: true needs the JSONL file make-probe-corpus wrote"),
    ]
    for source, base, message in cases:
        with pytest.raises(ValueError) as raised:
            check_self_generated(source, base)
        assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_expanded_model_accepts_a_corpus_sampled_from_its_source(models, replay):
    path, _ = replay
    assert base_fingerprint(models["a_expanded"]) == base_fingerprint(models["a"])
    assert base_fingerprint(models["a_expanded"]) != fingerprint_checkpoint(open_checkpoint(models["a_expanded"]))
    check_self_generated(path, base_fingerprint(models["a_expanded"]))


def test_a_mixture_source_may_say_it_is_self_generated_and_unknown_keys_are_still_refused():
    sources = DataConfig(
        domain=[{"path": "d.jsonl", "weight": 3}, {"path": "r.jsonl", "weight": 1, "name": "replay", "self_generated": True}]
    )
    assert [source.self_generated for source in sources.domain_sources()] == [False, True]
    with pytest.raises(ValueError, match=r"a mapping with path, weight and optionally name, text_field and self_generated"):
        DataConfig(domain=[{"path": "r.jsonl", "self_genrated": True}])
    with pytest.raises(ValueError, match=r"data.domain\[0\].self_generated='yes': need true or false"):
        DataConfig(domain=[{"path": "r.jsonl", "self_generated": "yes"}])


def test_check_verifies_a_self_generated_source_and_train_refuses_one_from_another_model(models, replay, tmp_path, capsys):
    """README's two steps, through the console script: `adept-ds check` prints the verified source; a corpus of
    model B under a run of A's expansion is refused by `check` and by `adept-ds train` before any rank starts."""
    path, _ = replay
    domain = write_jsonl(tmp_path / "domain.jsonl", sentences(20, seed=1))
    other = tmp_path / "replay_b.jsonl"
    make_probe_corpus(models["b"], other, 20, show_progress=False, **SIZES)
    capsys.readouterr()  # transformers' weight-loading bar

    def run_config(replayed: Path) -> Path:
        config = {
            "model": str(models["a_expanded"]),
            "method": "llama_pro",  # no general corpus needed: trains the copies at one learning rate
            "output_dir": str(tmp_path / "run"),
            "data": {
                "domain": [
                    {"path": str(domain), "weight": 0.75},
                    {"path": str(replayed), "weight": 0.25, "name": "replay", "self_generated": True},
                ]
            },
        }
        file = tmp_path / f"run_{replayed.stem}.yaml"
        file.write_text(yaml.safe_dump(config))
        return file

    script = Path(sys.executable).parent / "adept-ds"
    done = subprocess.run(
        [str(script), "check", str(run_config(path)), "--device", "cpu", "--skip-data"], capture_output=True, text=True, env=cpu_env()
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"self-replay: domain:replay {path}: sampled from {models['a'].absolute()} (fingerprint {base_fingerprint(models['a'])}"
        in done.stdout
    )

    for command in (["check", "--device", "cpu", "--skip-data"], ["train", "--num-gpus", "2"]):
        assert cli_main([command[0], str(run_config(other)), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert "data.domain source 'replay': " in err and f"{other} was sampled from {models['b'].absolute()}" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
