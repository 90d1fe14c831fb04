"""Data at scale: token-store preparation, its memory, disk bytes, the sampler and startup, in one run.

    python benchmarks/data_scale.py [--small 20e6] [--large 200e6] [--workdir benchmarks/results/work/data]

Writes benchmarks/results/data_scale.{json,md} and prints the table. Corpora are generated word salad
(words of the bundled general corpus, documents of 50-400 words) tokenised with the demo model's
tokenizer (49,152 ids: uint16). Measured here:
- prepare throughput (tokens/s, wall time of `prepare_store`: reading JSONL, tokenising, packing,
  writing) against the tokenizer's own batched throughput on the same documents, with 1 worker against
  the tokenizer on 1 thread, and 2 workers against the tokenizer on 2 threads (its Rust thread pool);
- peak RSS of preparing (the sum over the process tree, sampled every 50 ms) at both corpus sizes;
- bytes on disk per token; the sampler's time per step at 10^6, 10^8, 10^10 blocks; and a run's data
  startup (opening a prepared store and reading its first batch) at both sizes, in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BLOCK = 256
GLOBAL_BATCH = 512  # blocks per step: e.g. 64 ranks x micro-batch 8


def generate_corpus(path: Path, tokens: int, tokens_per_byte: float) -> Path:
    """JSONL word salad of about `tokens` tokens (estimated from a sample's tokens per byte)."""
    if path.is_file():
        return path
    words = " ".join(json.loads(line)["text"] for line in open(REPO / "adept_ds" / "assets" / "general_en.jsonl")).split()
    rng = random.Random(0)
    target_bytes = int(tokens / tokens_per_byte)
    staging = path.with_suffix(".partial")
    written = 0
    with open(staging, "w") as handle:
        while written < target_bytes:
            lines = [json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 400)))}) + "\n" for _ in range(2000)]
            text = "".join(lines)
            handle.write(text)
            written += len(text)
    staging.rename(path)
    return path


def sample_documents(path: Path, count: int) -> list[str]:
    with open(path) as handle:
        return [json.loads(next(handle))["text"] for _ in range(count)]


TOKENIZE = """
import json, sys, time
from transformers import AutoTokenizer
from adept_ds.data.token_store import encode_documents
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
docs = json.load(open(sys.argv[2]))
started, tokens = time.perf_counter(), 0
for start in range(0, len(docs), 256):
    tokens += sum(len(ids) + 1 for ids in encode_documents(tokenizer, docs[start:start + 256]))
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - started}))
"""

PREPARE = """
import json, sys, time
from transformers import AutoTokenizer
from adept_ds.data.token_store import prepare_store
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
started = time.perf_counter()
store = prepare_store(sys.argv[2], sys.argv[3], tokenizer, int(sys.argv[4]), num_workers=int(sys.argv[5]), show_progress=False)
print(json.dumps({"tokens": store.manifest["tokens_read"], "seconds": time.perf_counter() - started}))
"""

STARTUP = """
import json, sys, time
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
started = time.perf_counter()
from adept_ds.data.blocks import load_blocks
store = load_blocks(sys.argv[2], tokenizer, int(sys.argv[3]), sys.argv[4], vocab_size=len(tokenizer))
batch = store[list(range(0, len(store), max(1, len(store) // 16)))[:16]]
print(json.dumps({"seconds": time.perf_counter() - started, "blocks": len(store)}))
"""


def run_python(code: str, *args: str, env: dict | None = None, measure_rss: bool = False) -> dict:
    """Run `code` in a fresh interpreter; with `measure_rss`, also the peak summed RSS of its process tree."""
    import psutil

    process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    peak = 0
    if measure_rss:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"benchmark step failed (exit {process.returncode}): {args}")
    result = json.loads(out.strip().splitlines()[-1])
    if measure_rss:
        result["peak_rss_mb"] = peak / 2**20
    return result


def sampler_ms(num_blocks: int, steps: int = 500) -> float:
    from adept_ds.data.sampler import sample_order

    rng = random.Random(num_blocks)
    times = []
    for _ in range(steps):
        start = rng.randrange(0, 3 * num_blocks)
        began = time.perf_counter()
        sample_order(num_blocks, 0, start, GLOBAL_BATCH)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def mixture_ms(sizes: list[int], steps: int = 500) -> float:
    from adept_ds.data.sampler import Mixture

    mixture, counts, times = Mixture(sizes, [3.0, 1.0][: len(sizes)], 0), [0] * len(sizes), []
    for _ in range(steps):
        began = time.perf_counter()
        _, counts = mixture.draw(counts, GLOBAL_BATCH)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=float, default=20e6, help="tokens of the small corpus (default 20M)")
    parser.add_argument("--large", type=float, default=200e6, help="tokens of the large corpus (default 200M)")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "work" / "data")
    parser.add_argument("--baseline-docs", type=int, default=20000, help="documents for the tokenizer-only baseline")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from adept_ds.data.token_store import encode_documents
    from adept_ds.model.demo_model import fetch_demo_model

    model = str(fetch_demo_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    words = " ".join(json.loads(line)["text"] for line in open(REPO / "adept_ds" / "assets" / "general_en.jsonl"))
    tokens_per_byte = len(encode_documents(tokenizer, [words])[0]) / len(words.encode())
    corpora = {}
    for name, tokens in (("small", args.small), ("large", args.large)):
        print(f"[data_scale] corpus {name}: ~{tokens / 1e6:.0f}M tokens", flush=True)
        corpora[name] = generate_corpus(work / f"corpus_{int(tokens / 1e6)}M.jsonl", int(tokens), tokens_per_byte)

    docs_file = work / "baseline_docs.json"
    docs_file.write_text(json.dumps(sample_documents(corpora["small"], args.baseline_docs)))
    one_thread = {"TOKENIZERS_PARALLELISM": "false"}
    two_threads = {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "2", "RAYON_RS_NUM_CPUS": "2"}
    results: dict = {"block_size": BLOCK, "machine": {"cores": os.cpu_count()}, "tokenizer": model}
    print("[data_scale] tokenizer baselines", flush=True)
    baseline = {
        1: run_python(TOKENIZE, model, str(docs_file), env=one_thread),
        2: run_python(TOKENIZE, model, str(docs_file), env=two_threads),
    }

    prepared = {}
    for workers in (1, 2):
        output = work / f"store_small_w{workers}"
        subprocess.run(["rm", "-rf", str(output)], check=True)
        print(f"[data_scale] prepare small corpus, {workers} worker(s)", flush=True)
        prepared[workers] = run_python(PREPARE, model, str(corpora["small"]), str(output), str(BLOCK), str(workers), measure_rss=True)
    output = work / "store_large"
    subprocess.run(["rm", "-rf", str(output)], check=True)
    print("[data_scale] prepare large corpus, 2 workers", flush=True)
    large = run_python(PREPARE, model, str(corpora["large"]), str(output), str(BLOCK), "2", measure_rss=True)

    throughput = {}
    for workers in (1, 2):
        tokenizer_rate = baseline[workers]["tokens"] / baseline[workers]["seconds"]
        prepare_rate = prepared[workers]["tokens"] / prepared[workers]["seconds"]
        throughput[workers] = {"tokenizer_tok_s": tokenizer_rate, "prepare_tok_s": prepare_rate, "ratio": prepare_rate / tokenizer_rate}
    results["throughput"] = throughput
    results["peak_rss_mb"] = {
        "small": prepared[2]["peak_rss_mb"],
        "large": large["peak_rss_mb"],
        "small_tokens": prepared[2]["tokens"],
        "large_tokens": large["tokens"],
    }
    results["peak_rss_mb"]["ratio"] = results["peak_rss_mb"]["large"] / results["peak_rss_mb"]["small"]
    manifest = json.loads((output / "manifest.json").read_text())
    disk = sum(f.stat().st_size for f in output.iterdir())
    results["disk"] = {"bytes": disk, "tokens": manifest["num_tokens"], "bytes_per_token": disk / manifest["num_tokens"]}
    results["large_prepare"] = large

    print("[data_scale] sampler and startup", flush=True)
    results["sampler_ms"] = {f"1e{exp}": sampler_ms(10**exp) for exp in (6, 8, 10)}
    results["mixture_ms"] = mixture_ms([10**8, 10**7])
    cache = work / "unused_cache"
    results["startup_s"] = {
        "small": run_python(STARTUP, model, str(work / "store_small_w2"), str(BLOCK), str(cache))["seconds"],
        "large": run_python(STARTUP, model, str(output), str(BLOCK), str(cache))["seconds"],
    }
    write(results)


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    t, rss, disk = results["throughput"], results["peak_rss_mb"], results["disk"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [
        (
            "prepare / tokenizer throughput, 1 worker vs 1 thread",
            f"{t[1]['ratio']:.2f} ({t[1]['prepare_tok_s']:,.0f} / {t[1]['tokenizer_tok_s']:,.0f} tok/s)",
            ">= 0.8",
            met(t[1]["ratio"] >= 0.8),
        ),
        (
            "prepare / tokenizer throughput, 2 workers vs 2 threads",
            f"{t[2]['ratio']:.2f} ({t[2]['prepare_tok_s']:,.0f} / {t[2]['tokenizer_tok_s']:,.0f} tok/s)",
            ">= 0.8",
            met(t[2]["ratio"] >= 0.8),
        ),
        (
            f"peak RSS of prepare, {rss['small_tokens'] / 1e6:.0f}M vs {rss['large_tokens'] / 1e6:.0f}M tokens",
            f"{rss['small']:.0f} MB vs {rss['large']:.0f} MB (x{rss['ratio']:.2f})",
            "<= 1.2x",
            met(rss["ratio"] <= 1.2),
        ),
        (
            "bytes on disk per token",
            f"{disk['bytes_per_token']:.4f} ({disk['bytes'] / 1e6:.0f} MB, {disk['tokens'] / 1e6:.0f}M tokens)",
            "<= 2.05",
            met(disk["bytes_per_token"] <= 2.05),
        ),
    ]
    for size, ms in results["sampler_ms"].items():
        rows.append((f"sampler per step ({GLOBAL_BATCH} blocks) at {size} blocks", f"{ms:.3f} ms", "<= 1 ms", met(ms <= 1.0)))
    rows.append((f"mixture draw per step (2 sources, {GLOBAL_BATCH} blocks)", f"{results['mixture_ms']:.3f} ms", "-", "-"))
    for size, seconds in results["startup_s"].items():
        rows.append((f"data startup on the prepared {size} store", f"{seconds:.3f} s", "<= 2 s", met(seconds <= 2.0)))
    lines = ["| measure | value | target | |", "|---|---|---|---|", *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]]
    text = "\n".join(lines) + "\n"
    (RESULTS / "data_scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
