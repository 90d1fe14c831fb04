"""How close does a self-made probe corpus (`adept-ds make-probe-corpus`) come to real general text?

    python benchmarks/probe_corpus.py [--tokens 16384] [--probe-tokens 4096] [--real-seeds 0,1]

Samples `--tokens` tokens from the demo model (SmolLM2-135M) and mask-probes it on that corpus and on the
bundled general English (adept_ds/assets/general_en.jsonl), both with the same token budget, block size and
block-drawing seed (compare_seeds' probe: 128-token blocks, batches of 4). Compares the score vectors:
Spearman rho, and the overlap of the k least important layers for k = 4, 8 and the auto k (adept_ds.probe.auto_k,
the real-text probe's and the generated one's). A second real-text probe (another seed of blocks) gives the
baseline: how close two draws of real text come to each other. Steps whose output is in `--work` with the
same inputs are reused. Writes benchmarks/results/probe_corpus-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from suite import BENCHMARKS, machine, write_result  # noqa: E402


def ranks(values) -> list[float]:
    """Ranks from 1, ties at their mean rank (what Spearman's rho needs; scipy is not a dependency)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked.tolist()


def spearman(a, b) -> float:
    import numpy as np

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def overlap(a, b, k: int) -> float:
    """Share of the k least important layers of `a` that are also among the k least important of `b`."""
    from adept_ds.probe.layers import least_important_layers

    return len(set(least_important_layers(a, k)) & set(least_important_layers(b, k))) / k


def file_digest(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def probed(model, data: Path, output: Path, args, seed: int) -> dict:
    """The mask probe of `model` on `data`, reused from `output` when it was measured on the same inputs
    (model fingerprint, corpus bytes, budget, blocks, seed)."""
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.probe.layers import probe_model, read_probe_result, write_probe_result

    wanted = {"num_tokens": args.probe_tokens, "block_size": 128, "seed": seed, "method": "mask"}
    wanted["model_fingerprint"] = fingerprint_checkpoint(open_checkpoint(model))
    if output.is_file():
        result = read_probe_result(output)
        if all(result.get(key) == value for key, value in wanted.items()) and file_digest(Path(result["data"])) == file_digest(data):
            return result
    started = time.perf_counter()
    result = probe_model(model, data, output, max_tokens=args.probe_tokens, block_size=128, batch_size=4, seed=seed)
    write_probe_result(output, result | {"seconds": time.perf_counter() - started})  # its time, for a rerun's table
    return read_probe_result(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to sample (default 16384)")
    parser.add_argument("--probe-tokens", type=int, default=4096, help="probe token budget, both corpora (default 4096)")
    parser.add_argument("--real-seeds", default="0,1", help="real-text probe seeds: the first is the reference (default 0,1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("runs/probe_corpus"))
    args = parser.parse_args()
    real_seeds = [int(seed) for seed in args.real_seeds.split(",")]

    from adept_ds.model.checkpoint import open_checkpoint
    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.model.families import get_family
    from adept_ds.pipeline import GENERAL
    from adept_ds.probe.auto_k import choose_k, parameter_counts
    from adept_ds.probe.corpus import make_probe_corpus

    started = time.perf_counter()
    model = fetch_demo_model()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    corpus, stats_file = work / "generated.jsonl", work / "generated_stats.json"
    settings = {"tokens": args.tokens, "seed": args.seed, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    if not corpus.is_file() or stats.get("settings") != settings:
        stats = make_probe_corpus(
            model, corpus, args.tokens, seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
        )
        stats_file.write_text(json.dumps({**stats, "settings": settings}, indent=2))
    generated = probed(model, corpus, work / "probe_generated.json", args, real_seeds[0])
    real = [probed(model, GENERAL, work / f"probe_real_seed{seed}.json", args, seed) for seed in real_seeds]

    checkpoint = open_checkpoint(model)
    counts = parameter_counts(checkpoint, get_family(checkpoint.config["model_type"]))
    auto_real, auto_generated = (choose_k(result["scores"], *counts) for result in (real[0], generated))
    pairs = {"generated vs real": (generated, real[0])}
    pairs |= {f"real seed {seed} vs real seed {real_seeds[0]}": (other, real[0]) for seed, other in zip(real_seeds[1:], real[1:])}
    rows = []
    for name, (a, b) in pairs.items():
        row = {"pair": name, "spearman": spearman(a["scores"], b["scores"])}
        for k in (4, 8, auto_real.k):
            row[f"top{k}_overlap"] = overlap(a["scores"], b["scores"], k)
        choice = choose_k(a["scores"], *counts)
        row |= {"auto_k": choice.k, "auto_layers": choice.layers}
        rows.append(row)
    result = {
        "machine": machine(),
        "generation": {key: stats[key] for key in ("tokens", "documents", "sampled_tokens", "seconds", "tokens_per_second", "dtype")},
        "settings": settings | {"probe_tokens": args.probe_tokens, "block_size": 128, "real_seeds": real_seeds},
        "probe_seconds": {"generated": generated.get("seconds"), **{f"real seed {s}": r.get("seconds") for s, r in zip(real_seeds, real)}},
        "base_loss": {"generated": generated["base_loss"], "real": real[0]["base_loss"]},
        "scores": {"generated": generated["scores"], **{f"real seed {s}": r["scores"] for s, r in zip(real_seeds, real)}},
        "auto_k": {"real": auto_real.layers, "generated": auto_generated.layers},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    ks = (4, 8, auto_real.k)
    header = "| pair | Spearman rho | " + " | ".join(f"top-{k} overlap" for k in ks) + " | auto k (its layers) |\n"
    header += "|---|---|" + "---|" * len(ks) + "---|\n"
    lines = [
        f"| {row['pair']} | {row['spearman']:.3f} | "
        + " | ".join(f"{row[f'top{k}_overlap']:.2f}" for k in ks)
        + f" | {row['auto_k']} ({', '.join(map(str, row['auto_layers']))}) |"
        for row in rows
    ]
    gen = result["generation"]
    probe_times = ", ".join(
        f"{name} {'reused' if seconds is None else f'{seconds:.0f} s'}" for name, seconds in result["probe_seconds"].items()
    )
    table = (
        f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); demo model (SmolLM2-135M), mask probe, "
        f"{args.probe_tokens} tokens in 128-token blocks drawn with seed {real_seeds[0]}; top-{auto_real.k} = the real "
        f"probe's auto k. `{' '.join(['python', f'benchmarks/{Path(__file__).name}', *sys.argv[1:]])}`; probes: {probe_times} "
        f"(reused: an earlier run's result on the same inputs).\n\n"
        f"Generated corpus: {gen['tokens']:,} tokens in {gen['documents']} documents (seed {args.seed}, batch {args.batch_size}, "
        f"at most {args.max_new_tokens} tokens each, T=1.0, top-p 0.95, from BOS), sampled in {gen['seconds']:.0f} s: "
        f"{gen['tokens_per_second']:.1f} tokens/s ({gen['dtype']}). Base loss on it {generated['base_loss']:.3f}, "
        f"on real text {real[0]['base_loss']:.3f}.\n\n" + header + "\n".join(lines) + "\n"
    )
    write_result(BENCHMARKS / "results", "probe_corpus", result, table)


if __name__ == "__main__":
    main()
