"""Self-replay: a mixture source of text the run's base model wrote itself, and the proof that it did.

Replaying general text during continual pretraining reduces forgetting; a user without a general corpus can replay
text sampled from the base model (`adept-ds make-probe-corpus`, probe/corpus.py). Two steps, kept apart so a 70B user
can generate on its own job:

1. `adept-ds make-probe-corpus --model BASE --tokens N --output replay.jsonl` writes the JSONL and, once it is
   complete, `replay.jsonl.manifest.json` (`adept_ds.self_generated/1`): the model it sampled from, that model's
   fingerprint, the sampling settings, the documents written and the file's size.
2. The run config names it as a mixture source with `self_generated: true`; `adept-ds check` and `adept-ds train`
   read the manifest (a JSON read, no tokens) and refuse text from another model than the run's base model: the
   expanded model's source, or the model itself when it was not expanded.

`probe.corpus.self_generated_corpus` generates into a cache keyed by `cache_key` for programs (the sweep command).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
from adept_ds.model.expand import MANIFEST_NAME, read_manifest

MANIFEST_FORMAT = "adept_ds.self_generated/1"
SETTINGS = ("tokens", "seed", "temperature", "top_p", "max_new_tokens", "batch_size")
"""The sampling settings a manifest records and a cache key covers (each changes the text written)."""


def manifest_path(corpus: str | Path) -> Path:
    """FILE.jsonl -> FILE.jsonl.manifest.json, beside it."""
    corpus = Path(corpus)
    return corpus.with_name(corpus.name + ".manifest.json")


def sampling_settings(tokens: int, seed: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int) -> dict:
    """The settings as a manifest records them: ints and floats, so that 1 and 1.0 compare (and hash) equal."""
    return {
        "tokens": int(tokens),
        "seed": int(seed),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
    }


def write_manifest(corpus: Path, model_dir: str | Path, fingerprint: str, settings: dict, documents: int, generated_tokens: int) -> Path:
    """Write `corpus`'s manifest atomically (temp file + os.replace): call it only once the corpus itself is complete."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": str(Path(model_dir).absolute()),
        "model_fingerprint": fingerprint,
        **settings,
        "documents": documents,
        "generated_tokens": generated_tokens,
        "bytes": corpus.stat().st_size,
    }
    path = manifest_path(corpus)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, path)
    return path


def read_self_generated(corpus: str | Path) -> dict:
    """The manifest of a corpus `make-probe-corpus` wrote, after checking it still describes the file beside it."""
    corpus, path = Path(corpus), manifest_path(corpus)
    if corpus.is_dir():
        raise ValueError(
            f"{corpus} is a directory: self_generated: true needs the JSONL file make-probe-corpus wrote, beside its "
            f"manifest {path.name} (a token store or directory prepared from it cannot be traced); give that .jsonl path"
        )
    if not path.is_file():
        raise ValueError(
            f"{corpus} has no manifest {path}: it was not written by adept-ds make-probe-corpus; generate it with "
            f"`adept-ds make-probe-corpus --model BASE --tokens N --output {corpus}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON manifest ({err}); regenerate {corpus} with `adept-ds make-probe-corpus`") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}: not a manifest of adept-ds make-probe-corpus; "
            f"regenerate {corpus} with `adept-ds make-probe-corpus`"
        )
    size = corpus.stat().st_size if corpus.is_file() else None
    if size != manifest.get("bytes"):
        raise ValueError(
            f"{corpus} holds {size} bytes but its manifest {path.name} records {manifest.get('bytes')}: the file changed after "
            "make-probe-corpus wrote it; regenerate it with `adept-ds make-probe-corpus`"
        )
    return manifest


def base_fingerprint(model_dir: str | Path, own: str | None = None) -> str:
    """The fingerprint of the model a run starts from: an expanded model's source (its expansion manifest records
    it), else the model itself (`own`, when the caller has already fingerprinted it). Self-replay text must have been
    sampled from this model."""
    if (Path(model_dir) / MANIFEST_NAME).is_file():
        return read_manifest(model_dir)["source_fingerprint"]
    return own or fingerprint_checkpoint(open_checkpoint(model_dir))


def check_self_generated(source_path: str | Path, base_fingerprint: str) -> str:
    """A one-line summary of a self-generated corpus, after checking it was sampled from the model with
    `base_fingerprint`; ValueError in one line if it was not, or if its provenance cannot be read."""
    manifest = read_self_generated(source_path)
    if manifest.get("model_fingerprint") != base_fingerprint:
        raise ValueError(
            f"{source_path} was sampled from {manifest.get('model')} (fingerprint {manifest.get('model_fingerprint')}), "
            f"not from this run's base model (fingerprint {base_fingerprint}); self-replay text must come from the model "
            "training starts from (an expanded model's source): regenerate it with `adept-ds make-probe-corpus --model BASE ...`"
        )
    return (
        f"{source_path}: sampled from {manifest['model']} (fingerprint {base_fingerprint}, the run's base model), "
        f"{manifest['documents']:,} documents, --tokens {manifest['tokens']:,}, seed {manifest['seed']}, "
        f"temperature {manifest['temperature']}, top-p {manifest['top_p']}, max-new-tokens {manifest['max_new_tokens']}"
    )


def cache_key(fingerprint: str, settings: dict) -> str:
    """A short hash of the model's fingerprint and the sampling settings, from canonical JSON."""
    canonical = json.dumps({"model_fingerprint": fingerprint, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cached_corpus(cache_dir: str | Path, fingerprint: str, settings: dict) -> tuple[Path, bool]:
    """(where a corpus of this model and these settings lives in `cache_dir`, whether a complete one is there: its
    manifest names the same fingerprint and settings and still describes the file)."""
    corpus = Path(cache_dir) / f"self_generated_{cache_key(fingerprint, settings)}.jsonl"
    if not manifest_path(corpus).is_file():
        return corpus, False
    try:
        manifest = read_self_generated(corpus)
    except ValueError:
        return corpus, False  # a stale or foreign file under our name: generate over it
    recorded = {key: manifest.get(key) for key in SETTINGS}
    return corpus, manifest.get("model_fingerprint") == fingerprint and recorded == settings
