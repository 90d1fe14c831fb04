"""Does Stage 2 earn its keep? Methods and settings over several seeds on the demo model, decided by mean ± sd.

    python benchmarks/compare_seeds.py --seeds 3 --steps 60 [--variants adept,adept:rank,...] [--output runs/compare]
        [--set data.document_mask=true --set data.loss_on_document_start=false ...] [--eval-document-mask|--no-eval-document-mask]

A variant is `method`, `method:normalisation` (adept:per_type, adept:rank) or a replay recipe (adept_replay,
pt_full_replay: 25 % general replay; adept_replay5, pt_full_replay5: 5 %). Each seed s probes the demo model on a
seeded draw of general blocks, expands its k least important layers (`--k auto`: k chosen from that probe by
adept_ds.probe.auto_k), and trains every
variant with train.seed = s (data order and importance probe batches), 2 CPU ranks under ZeRO-3, then
evaluates held-out general and domain perplexity and domain accuracy. Writes `<output>/results.jsonl`
(one line per run, with its median step time), `<output>/study.md` (mean ± sd per variant, the Pareto front) and
`<output>/tradeoff.png` (general increase against domain drop, one point per run). It resumes: a run
that has its result line is not trained or evaluated again.

`--set KEY=VALUE` (repeatable) overrides a run-config key in every training run of the study. The document mask's
keys (data.document_mask, data.loss_on_document_start) also set how the probe scores its blocks, and how evaluation
does, unless one of two fixed evaluations is asked for, to compare studies alike: `--no-eval-document-mask`, plain
blocks with every token scored (as before the mask existed), or `--eval-document-mask`, each document scored alone
(the mask, document starts dropped). Give each study its own --output: its probes, models and before.json follow
its settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = "adept,adept:per_type,adept:rank,adept_no_stage2,adept_no_stage2_matched,adept_replay,llama_pro,pt_full,pt_full_replay"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default=VARIANTS, help=f"comma-separated (default {VARIANTS})")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"))
    parser.add_argument("--k", default="4", help="layers to expand, or auto: chosen from each seed's probe (adept_ds.probe.auto_k)")
    parser.add_argument("--probe-tokens", type=int, default=4096)
    parser.add_argument("--max-questions", type=int, default=100)
    parser.add_argument("--num-procs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run-config override for every training run")
    parser.add_argument(
        "--eval-document-mask",
        action=argparse.BooleanOptionalAction,
        help="held-out perplexity of each document alone (--no-: of plain blocks, every token scored); default: as --set says",
    )
    args = parser.parse_args()
    if args.k != "auto" and not args.k.isdigit():
        raise SystemExit(f"--k {args.k!r}: a number of layers or auto")

    from adept_ds.data.blocks import Packing
    from adept_ds.evaluation.evaluate import evaluate_model
    from adept_ds.evaluation.study import aggregate, markdown_table, pareto_front, plot_tradeoff, run_result, step_seconds
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.demo_model import fetch_demo_model
    from adept_ds.model.expand import expand_checkpoint, uniform_layers
    from adept_ds.pipeline import DOMAIN_TEST, GENERAL, GENERAL_HELDOUT, REPLAY, train_method
    from adept_ds.probe.layers import layers_from_probe, probe_model, probe_result_for
    from adept_ds.run.config import METHODS, NORMALIZATIONS, load_run_config

    try:  # a bad key or value is refused now, not hours into the study
        data = load_run_config(None, args.set).data
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    sets = dict(item.split("=", 1) for item in args.set)
    packing = Packing(document_mask=data.document_mask, loss_on_document_start=data.loss_on_document_start)
    fixed = Packing(document_mask=True, loss_on_document_start=False) if args.eval_document_mask else Packing()
    eval_packing = packing if args.eval_document_mask is None else fixed
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:  # every name is checked before hours of training
        method, _, normalize = variant.partition(":")
        if REPLAY.get(method, (method,))[0] not in METHODS or (normalize and normalize not in NORMALIZATIONS):
            raise SystemExit(f"unknown variant {variant!r}: a method ({', '.join([*METHODS, *REPLAY])}) or method:normalisation")
    methods = {variant.partition(":")[0] for variant in variants}
    output = args.output.absolute()
    output.mkdir(parents=True, exist_ok=True)
    results_file = output / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    done = {(r["variant"], r["seed"]) for r in results}
    original = fetch_demo_model()
    num_layers = open_checkpoint(original).config["num_hidden_layers"]
    corpora = {"general": GENERAL_HELDOUT, "domain": DOMAIN_TEST}
    before_file = output / "before.json"
    if not before_file.is_file():
        before_file.write_text(
            json.dumps(evaluate_model(original, corpora, DOMAIN_TEST, max_questions=args.max_questions, packing=eval_packing))
        )
    before = json.loads(before_file.read_text())

    for seed in range(args.seeds):
        seed_dir = output / f"seed{seed}"
        probe_file = seed_dir / "probe.json"
        if not probe_file.is_file():
            probe_model(
                original, GENERAL, probe_file, max_tokens=args.probe_tokens, block_size=128, batch_size=4, seed=seed, packing=packing
            )
        checkpoint = open_checkpoint(original)
        fingerprint = fingerprint_checkpoint(checkpoint)
        if args.k == "auto":
            from adept_ds.model.families import get_family
            from adept_ds.probe.auto_k import choose_k, parameter_counts

            counts = parameter_counts(checkpoint, get_family(checkpoint.config["model_type"]))
            choice = choose_k(probe_result_for(probe_file, fingerprint, num_layers)["scores"], *counts)
            k, layers = choice.k, choice.layers
            print(f"[compare] seed {seed}: {choice.reason()}", flush=True)
        else:
            k = int(args.k)
            layers = layers_from_probe(probe_file, k, fingerprint, num_layers)
        # One uniform expansion per k: an automatic k can differ between seeds' probes.
        models = {"adept": seed_dir / "adept_expanded", "llama_pro": output / f"llama_pro_expanded_k{k}"}
        expansions = {"adept": layers}
        if "llama_pro" in methods:  # only what some variant trains from
            expansions["llama_pro"] = uniform_layers(num_layers, k)
        for name, chosen in expansions.items():
            if not (models[name] / "adept_expansion.json").is_file():
                expand_checkpoint(original, models[name], chosen, overwrite=True, show_progress=False)
        for variant in variants:
            if (variant, seed) in done:
                continue
            name, _, normalize = variant.partition(":")
            method, replay = REPLAY.get(name, (name, 0.0))
            model = {"llama_pro": models["llama_pro"], "pt_full": original, "adept_no_stage1": original}.get(method, models["adept"])
            extra = {**sets, "train.seed": seed, **({"importance.normalize": normalize} if normalize else {})}
            print(f"[compare] seed {seed}: {variant}", flush=True)
            run_dir = train_method(
                method, model, seed_dir / variant.replace(":", "_"), probe_file, args.steps, args.num_procs, replay, extra
            )
            after = evaluate_model(run_dir / "final", corpora, DOMAIN_TEST, max_questions=args.max_questions, packing=eval_packing)
            result = run_result(variant, seed, before, after) | {"k": k, "layers": layers, "step_s": step_seconds(run_dir)}
            result["perplexity"] = {name: after["perplexity"][name]["perplexity"] for name in corpora}
            results.append(result)
            with open(results_file, "a") as handle:
                handle.write(json.dumps(result) + "\n")

    table = aggregate(results)
    front = pareto_front(results)
    plot_tradeoff(results, output / "tradeoff.png")
    text = (
        markdown_table(table)
        + "\nPareto front (no other run forgets less and learns more): "
        + ", ".join(f"{r['variant']} (seed {r['seed']})" for r in front)
    )
    (output / "study.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
