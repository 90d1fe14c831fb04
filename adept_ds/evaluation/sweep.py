"""`adept-ds sweep`: which recipe forgets least for the domain it gains, on the user's own run.

Every recipe (`Variant`) at every learning rate and seed trains through DeepSpeed's launcher at the run's world size,
from the run config with only the recipe's keys changed; its exported model is evaluated on the held-out corpora
(in this process, on one device), then merged toward the base at a few alphas (merge_curve) and evaluated again.

Before the first run the sweep measures what it will cost: a few steps of each method it trains (`calibrate`) and
one evaluation of the base model. It prints the estimate, and refuses to start when a budget is given and the
estimate exceeds it. Everything it measures is written as it goes, so a stopped sweep resumes where it stopped:
`OUTPUT/calibration.json`, `OUTPUT/before.json`, `OUTPUT/results.jsonl` (one line per finished run, its merge
curve included) and `OUTPUT/report.md` with `OUTPUT/tradeoff.png`, rewritten after every run.

A recipe's best learning rate is the one whose mean over seeds gains the most domain perplexity net of the general
perplexity it loses (domain drop - general increase, both in perplexity points); the report says when it is the end of
the grid, and shows every learning rate too. Its Pareto front is taken over every recipe at every learning rate and
their merges, not only the best learning rates, and again within each replay setting two or more methods ran at
(which method wins at the replay a user can afford). The seeds vary the data order and the importance batches; the
expansion (the run config's model) is the same for every seed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from adept_ds.evaluation.study import STEP_TIME, aggregate, finish_tradeoff, markdown_table, pareto_front, run_result, step_seconds

DEFAULT_VARIANTS = "adept,adept+replay25,pt_full,pt_full+replay25"
REPLAY = {
    "adept_replay": ("adept", 0.25),
    "pt_full_replay": ("pt_full", 0.25),
    "adept_replay5": ("adept", 0.05),
    "pt_full_replay5": ("pt_full", 0.05),
}
"""The demo's and compare_seeds' recipes with replay: (method, share of general samples in the training stream). PT-Full
with replay is the baseline most continual-pretraining users would otherwise pick; ADEPT with replay combines both."""
ALIASES = {name: f"{method}+replay{share * 100:g}" for name, (method, share) in REPLAY.items()}
"""The demo's and compare_seeds' names for recipes with replay (pt_full_replay: pt_full+replay25)."""
REPLAY_KINDS = ("replay", "self_replay")


class BudgetExceeded(ValueError):
    """The sweep's measured estimate is over --budget-hours."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """A recipe: a method, optionally with a share of general (or self-generated) replay, optionally at a fixed LR."""

    name: str
    method: str
    replay: float = 0.0
    self_replay: bool = False
    lr: float | None = None


def parse_variant(text: str) -> Variant:
    """`METHOD[+replayPCT|+self_replayPCT][@LR]`: `adept`, `adept+replay25`, `pt_full+self_replay5`, `llama_pro@3e-4`."""
    from adept_ds.run.config import METHODS

    usage = "a variant is METHOD[+replayPCT|+self_replayPCT][@LR], e.g. adept+replay25 or llama_pro@3e-4"
    spec, _, lr_text = text.strip().partition("@")
    spec = ALIASES.get(spec, spec)
    method, _, extra = spec.partition("+")
    if method not in METHODS:
        raise ValueError(f"variant {text!r}: unknown method {method!r}: choose one of {', '.join(METHODS)} ({usage})")
    replay, self_replay = 0.0, False
    if extra:
        kind = next((k for k in sorted(REPLAY_KINDS, key=len, reverse=True) if extra.startswith(k)), None)
        try:
            percent = float(extra[len(kind) :]) if kind else None
        except ValueError:
            percent = None
        if percent is None or not 0 < percent < 100:
            raise ValueError(f"variant {text!r}: {extra!r} is not replayPCT or self_replayPCT with 0 < PCT < 100 ({usage})")
        replay, self_replay = percent / 100, kind == "self_replay"
    lr = None
    if lr_text:
        try:
            lr = float(lr_text)
        except ValueError:
            lr = -1.0
        if not lr > 0:
            raise ValueError(f"variant {text!r}: the learning rate after @ must be a positive number ({usage})")
    return Variant(spec, method, replay, self_replay, lr)


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        lrs = []
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"--lrs {text!r}: need comma-separated positive learning rates, e.g. 1e-4,3e-4,1e-3")
    return lrs


def label(variant: str, lr: float) -> str:
    return f"{variant} @ {lr:g}"


@dataclasses.dataclass
class Sweep:
    """What to sweep, resolved once from the command line and the run config."""

    config_file: Path
    overrides: list[str]  # the user's key=value overrides, applied to every run
    variants: list[Variant]
    lrs: list[float]
    seeds: int
    steps: int
    output: Path
    launcher: Callable[[], list[str]]  # DeepSpeed's launcher with the job's rank layout (a fresh port each call)
    world_size: int
    corpora: dict[str, str]
    qa: str | None = None
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75])
    max_blocks: int = 64
    max_questions: int | None = None
    budget_hours: float | None = None
    calibration_steps: int = 3
    keep_checkpoints: bool = False
    base: Path | None = None
    env: dict[str, str] | None = None  # the launcher's environment (DS_ACCELERATOR=cpu for CPU ranks)
    domain_mixture: str = ""  # the run config's data.domain when it mixes sources ("math 0.8, general 0.2"), else ""

    def runs(self) -> list[tuple[Variant, float, int]]:
        """Every (variant, lr, seed), seed first: a sweep stopped early has whole seeds to compare."""
        return [(v, lr, seed) for seed in range(self.seeds) for v in self.variants for lr in ([v.lr] if v.lr else self.lrs)]


def run_dir(sweep: Sweep, variant: Variant, lr: float, seed: int) -> Path:
    return sweep.output / "runs" / variant.name / f"lr{lr:g}" / f"seed{seed}"


def _launch(sweep: Sweep, overrides: dict) -> None:
    """One training run under DeepSpeed's launcher, continuing a checkpoint it left if stopped."""
    command = [*sweep.launcher(), "--module", "adept_ds.train", "--config", str(sweep.config_file), *sweep.overrides]
    command += [f"{key}={value}" for key, value in overrides.items()] + ["--auto-resume"]
    shown = " ".join(f"{key}={value}" for key, value in overrides.items() if key != "data.domain")  # the mixture is long JSON
    print(f"[sweep] + {command[0]} ... {shown}", flush=True)
    subprocess.run(command, check=True, env=sweep.env)


def models_for(sweep: Sweep, config) -> dict[str, Path]:
    """The model each method trains from: the run's expanded model, a uniform expansion of the same k for llama_pro,
    the base for methods that do not expand. Refuses a run config whose model was not expanded when one is needed."""
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.expand import MANIFEST_NAME, expand_checkpoint, read_manifest, uniform_layers
    from adept_ds.run.config import METHOD_SPECS

    model = Path(config.model.path)
    expanded = (model / MANIFEST_NAME).is_file()
    needs_expansion = [v.name for v in sweep.variants if METHOD_SPECS[v.method].expanded]
    if needs_expansion and not expanded:
        raise ValueError(
            f"{', '.join(needs_expansion)} train an expanded model, and the run config's model {model} is not one: point "
            "model at `adept-ds expand`'s output (the base it read is then found from its manifest)"
        )
    manifest = read_manifest(model) if expanded else None
    base = Path(sweep.base or (manifest["source_model"] if manifest else model))
    if manifest and fingerprint_checkpoint(open_checkpoint(base)) != manifest["source_fingerprint"]:
        raise ValueError(f"--base {base} is not the model {model} was expanded from (its fingerprint differs from the manifest's)")
    models = {"base": base, "expanded": model}
    if any(v.method == "llama_pro" for v in sweep.variants):
        k = len(manifest["expanded_layers"])
        models["llama_pro"] = sweep.output / "models" / f"llama_pro_k{k}"
        if not (models["llama_pro"] / MANIFEST_NAME).is_file():
            num_layers = open_checkpoint(base).config["num_hidden_layers"]
            expand_checkpoint(base, models["llama_pro"], uniform_layers(num_layers, k), overwrite=True, show_progress=False)
    return models


def model_for(models: dict[str, Path], method: str) -> Path:
    from adept_ds.run.config import METHOD_SPECS

    if method == "llama_pro":
        return models["llama_pro"]
    return models["expanded"] if METHOD_SPECS[method].expanded else models["base"]


def replay_mixture(config, variant: Variant, replay_corpus: str) -> str:
    """data.domain with `variant.replay` of the samples drawn from `replay_corpus`, as one JSON override."""
    sources = config.data.domain_sources()
    total = sum(source.weight for source in sources)
    mixture = [
        {"path": s.path, "weight": (1 - variant.replay) * s.weight / total, "name": s.name, "text_field": s.text_field} for s in sources
    ]
    replay = {"path": replay_corpus, "weight": variant.replay, "name": "replay"}
    mixture.append(replay | ({"self_generated": True} if variant.self_replay else {}))  # checked against the base by train
    return json.dumps(mixture)


def replay_corpus(sweep: Sweep, config, models: dict[str, Path], variant: Variant) -> str:
    if variant.self_replay:
        from adept_ds.probe.corpus import self_generated_corpus

        # What the replay share draws over one run (at least 4096 tokens): the sampler does not need more.
        per_step = config.train.micro_batch_size * config.train.gradient_accumulation_steps * sweep.world_size * config.data.block_size
        tokens = max(4096, int(variant.replay * sweep.steps * per_step) + 1)
        return str(self_generated_corpus(models["base"], tokens, sweep.output / "self_replay"))
    if not config.data.general:
        raise ValueError(f"variant {variant.name} replays general text: set data.general in the run config")
    return config.data.general


def run_overrides(sweep: Sweep, config, models, variant: Variant, lr: float, seed: int, steps: int, output: Path) -> dict:
    overrides = {
        "method": variant.method,
        "model": model_for(models, variant.method),
        "optimizer.lr": lr,
        "train.seed": seed,
        "train.max_steps": steps,
        "train.epochs": 0,
        "train.save_interval": min(config.train.save_interval or steps, steps),
        "output_dir": output,
    }
    if variant.replay:
        overrides["data.domain"] = replay_mixture(config, variant, replay_corpus(sweep, config, models, variant))
    return overrides


def calibrate(sweep: Sweep, config, models) -> dict[str, dict]:
    """{method: {"step_s", "overhead_s"}}: a few steps of each method the sweep trains, under the same launcher;
    overhead is the launch's wall time less its steps (start-up, loading, the final checkpoint)."""
    path = sweep.output / "calibration.json"
    measured = json.loads(path.read_text()) if path.is_file() else {}
    for variant in sweep.variants:
        if variant.method in measured:
            continue
        directory = sweep.output / "calibration" / variant.method
        shutil.rmtree(directory, ignore_errors=True)  # a half-measured calibration starts again
        print(f"[sweep] measuring {variant.method}'s step time: {sweep.calibration_steps} steps", flush=True)
        started = time.perf_counter()
        plain = dataclasses.replace(variant, replay=0.0, self_replay=False)
        overrides = run_overrides(sweep, config, models, plain, sweep.lrs[0], 0, sweep.calibration_steps, directory)
        _launch(sweep, overrides | {"train.export": False, "eval.interval": 0})
        wall = time.perf_counter() - started
        step = step_seconds(directory)
        measured[variant.method] = {"step_s": step, "overhead_s": max(0.0, wall - sweep.calibration_steps * step)}
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        path.write_text(json.dumps(measured, indent=2) + "\n")
    return measured


def estimate(sweep: Sweep, todo: list, calibration: dict, before: dict) -> dict:
    """Seconds the runs still to do will take: training from the measured step times, evaluation from the base's
    (each run scores its model's perplexity and QA, and each merge's perplexity; the merges' writing is not counted)."""
    train = sum(calibration[v.method]["overhead_s"] + sweep.steps * calibration[v.method]["step_s"] for v, _, _ in todo)
    evaluate = len(todo) * ((1 + len(sweep.alphas)) * before["perplexity_s"] + before["qa_s"])
    return {"runs": len(todo), "train_s": train, "evaluate_s": evaluate, "total_s": train + evaluate}


def describe_estimate(sweep: Sweep, cost: dict, calibration: dict, before: dict) -> str:
    steps = ", ".join(f"{method} {m['step_s']:.2f} s/step + {m['overhead_s']:.0f} s a launch" for method, m in calibration.items())
    qa = f" + QA {before['qa_s']:.0f} s" if sweep.qa else ""
    return (
        f"[sweep] {cost['runs']} runs to do x {sweep.steps} steps: about {cost['total_s'] / 3600:.2f} h "
        f"(training {cost['train_s'] / 60:.1f} min from the measured {steps}; evaluation {cost['evaluate_s'] / 60:.1f} min "
        f"from the base's: perplexity {before['perplexity_s']:.0f} s{qa}, for each run's model and its {len(sweep.alphas)} merges)"
    )


def run_sweep(sweep: Sweep) -> Path:
    """Calibrate, estimate (refusing an estimate over the budget), then train, evaluate and merge every run not yet
    done; returns the report's path."""
    from adept_ds.data.blocks import Packing
    from adept_ds.evaluation.evaluate import evaluate_model
    from adept_ds.evaluation.merge_curve import merge_curve
    from adept_ds.run.config import load_run_config

    config = load_run_config(sweep.config_file, sweep.overrides)
    config.validate_paths()
    packing = Packing(document_mask=config.data.document_mask, loss_on_document_start=config.data.loss_on_document_start)
    sweep.output.mkdir(parents=True, exist_ok=True)
    models = models_for(sweep, config)
    results_file = sweep.output / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    done = {(r["variant"], r["lr"], r["seed"]) for r in results}
    todo = [(v, lr, seed) for v, lr, seed in sweep.runs() if (v.name, lr, seed) not in done]

    def evaluate(model_dir, qa=sweep.qa) -> dict:
        return evaluate_model(model_dir, sweep.corpora, qa, config.data.block_size, sweep.max_blocks, sweep.max_questions, packing=packing)

    before_file = sweep.output / "before.json"
    if not before_file.is_file():  # timed in two parts, the units of the estimate: merges score perplexity only
        started = time.perf_counter()
        measured = evaluate(models["base"], qa=None)
        measured["perplexity_s"] = time.perf_counter() - started
        if sweep.qa:
            measured["qa"] = evaluate_model(models["base"], {}, sweep.qa, max_questions=sweep.max_questions)["qa"]
        measured["qa_s"] = time.perf_counter() - started - measured["perplexity_s"]
        before_file.write_text(json.dumps(measured, indent=2) + "\n")
    before = json.loads(before_file.read_text())
    if todo:
        for variant in {v.replay: v for v, _, _ in todo if v.self_replay}.values():  # sampled once, before the estimate
            replay_corpus(sweep, config, models, variant)
        calibration = calibrate(sweep, config, models)
        cost = estimate(sweep, todo, calibration, before)
        print(describe_estimate(sweep, cost, calibration, before), flush=True)
        if sweep.budget_hours is not None and cost["total_s"] > sweep.budget_hours * 3600:
            raise BudgetExceeded(
                f"the sweep needs about {cost['total_s'] / 3600:.2f} h for its {cost['runs']} runs still to do, over "
                f"--budget-hours {sweep.budget_hours:g}: give fewer --variants, --lrs, --seeds or --steps, or a larger budget"
            )
    for number, (variant, lr, seed) in enumerate(todo, 1):
        print(f"[sweep] run {number}/{len(todo)}: {label(variant.name, lr)}, seed {seed}", flush=True)
        directory = run_dir(sweep, variant, lr, seed)
        if not (directory / "final" / "config.json").is_file():
            _launch(sweep, run_overrides(sweep, config, models, variant, lr, seed, sweep.steps, directory))
        after = evaluate(directory / "final")
        result = run_result(variant.name, seed, before, after) | {"lr": lr, STEP_TIME: step_seconds(directory)}
        if sweep.alphas:
            result["merge_curve"] = merge_curve(
                models["base"],
                directory / "final",
                sweep.alphas,
                directory / "merge",
                sweep.corpora,
                None,  # the curve is perplexity against perplexity; accuracy is the trained model's
                sweep.max_blocks,
                show_progress=False,
                block_size=config.data.block_size,
                packing=packing,
                evaluations={0.0: before, 1.0: after},
                keep_models=False,
            )
        if not sweep.keep_checkpoints:  # the exported model and the figures are the run's result; its optimizer state is not
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        results.append(result)
        with open(results_file, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        write_report(sweep, results)
    return write_report(sweep, results)


def best_lrs(results: list[dict]) -> dict[str, float]:
    """Each variant's learning rate whose mean run has the largest domain drop - general increase."""
    best: dict[str, tuple[float, float]] = {}
    for (variant, lr), runs in _by_variant_lr(results).items():
        score = statistics.fmean(r["domain_drop"] - r["general_increase"] for r in runs)
        if variant not in best or score > best[variant][1]:
            best[variant] = (lr, score)
    return {variant: lr for variant, (lr, _) in best.items()}


def lrs_at_edge(results: list[dict], best: dict[str, float]) -> dict[str, str]:
    """{variant: "lowest"|"highest"} where the best learning rate is the end of the ones the variant ran at (two or
    more): its best may lie beyond the grid."""
    edges = {}
    for variant, lr in best.items():
        tried = sorted({r["lr"] for r in results if r["variant"] == variant})
        if len(tried) > 1 and lr in (tried[0], tried[-1]):
            edges[variant] = "lowest" if lr == tried[0] else "highest"
    return edges


def _by_variant_lr(results: list[dict]) -> dict[tuple[str, float], list[dict]]:
    grouped: dict[tuple[str, float], list[dict]] = {}
    for result in results:
        grouped.setdefault((result["variant"], result["lr"]), []).append(result)
    return grouped


def mean_curve(runs: list[dict]) -> list[dict]:
    """The merge curve averaged over seeds, alpha by alpha (alphas every run has)."""
    curves = [{p["alpha"]: p for p in run.get("merge_curve", [])} for run in runs]
    alphas = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    return [{"alpha": a, **{m: statistics.fmean(c[a][m] for c in curves) for m in ("general_increase", "domain_drop")}} for a in alphas]


def trade_off_points(results: list[dict]) -> list[dict]:
    """Every (variant, learning rate)'s mean over its seeds, and its mean merges strictly between the base and it:
    the points the Pareto front is taken over. A merge of a run at a high learning rate can beat the same recipe at a
    lower one on both axes, so no learning rate is left out of the front."""
    points = []
    for (variant, lr), runs in _by_variant_lr(results).items():
        mean = {m: statistics.fmean(r[m] for r in runs) for m in ("general_increase", "domain_drop")}
        points.append({"variant": variant, "lr": lr, "alpha": 1.0, "seeds": len(runs), "name": label(variant, lr), **mean})
        points += [
            {
                "variant": variant,
                "lr": lr,
                "alpha": p["alpha"],
                "seeds": len(runs),
                "name": f"{label(variant, lr)} merged at {p['alpha']:g}",
                **p,
            }
            for p in mean_curve(runs)
            if 0 < p["alpha"] < 1
        ]
    return points


def method_and_replay(variant_name: str, unreplayed: str = "no replay") -> tuple[str, str]:
    """(method, replay setting) of a variant: ("adept", "replay25") for adept+replay25, ("pt_full", unreplayed) for pt_full."""
    variant = parse_variant(variant_name)
    return variant.method, variant.name[len(variant.method) :].lstrip("+") or unreplayed


def fronts_by_replay(results: list[dict], unreplayed: str = "no replay") -> dict[str, list[dict]]:
    """The Pareto front within each replay setting that two or more methods ran at: does a method win at the same
    replay? Over all recipes together, the one that trains more weights on more replay can take the whole front.
    `unreplayed` names the setting of variants without +replay (the run config's own mixture, where it has one)."""
    settings: dict[str, list[dict]] = {}
    methods: dict[str, set[str]] = {}
    for r in results:
        method, setting = method_and_replay(r["variant"], unreplayed)
        settings.setdefault(setting, []).append(r)
        methods.setdefault(setting, set()).add(method)
    return {
        setting: sorted(pareto_front(trade_off_points(runs)), key=lambda p: p["general_increase"])
        for setting, runs in settings.items()
        if len(methods[setting]) > 1
    }


def trade_off_row(cells: list, point: dict) -> str:
    """A markdown row: the leading cells, then the point's general increase and domain drop."""
    return f"| {' | '.join(map(str, cells))} | {point['general_increase']:+.2f} | {point['domain_drop']:.2f} |"


def write_report(sweep: Sweep, results: list[dict]) -> Path:
    """report.md: each variant at its best LR (mean ± sd) with its interpolation curve, the Pareto front over every
    variant, learning rate and merge (and within each replay setting), and every LR's table; tradeoff.png draws them."""
    labelled = [r | {"variant": label(r["variant"], r["lr"])} for r in results]
    best = best_lrs(results)
    at_best = [r for r in results if r["lr"] == best[r["variant"]]]
    labelled_at_best = [row for row, r in zip(labelled, results) if r["lr"] == best[r["variant"]]]
    curves = {variant: mean_curve(runs) for (variant, _), runs in _by_variant_lr(at_best).items()}
    points = trade_off_points(results)
    front = sorted(pareto_front(points), key=lambda p: p["general_increase"])
    edges = lrs_at_edge(results, best)
    lines = [
        f"# Sweep of {sweep.config_file}",
        "",
        f"{len(results)} runs: {sweep.steps} steps each, seeds {min(r['seed'] for r in results)}-{max(r['seed'] for r in results)}, learning rates {', '.join(f'{lr:g}' for lr in sorted({r['lr'] for r in results}))}; "
        "general increase = held-out general perplexity after - before (forgetting, lower is better), domain drop = held-out "
        "domain perplexity before - after (learning, higher is better). Mean ± sample sd over seeds.",
        "",
        "## Each recipe at its best learning rate",
        "",
        "Best: the learning rate whose mean run gains the most domain perplexity net of the general perplexity it loses.",
        "",
        markdown_table(aggregate(labelled_at_best)),
    ]
    lines += [
        f"- {variant}: its best learning rate {best[variant]:g} is the {edge} it ran at; its best may lie beyond the grid."
        for variant, edge in edges.items()
    ]
    lines += [
        "",
        "## Pareto front",
        "",
        "Over every recipe at every learning rate, and their merges toward the base: nothing else forgets less and learns more.",
        "",
        "| point | seeds | general ppl increase | domain ppl drop |",
        "|---|---|---|---|",
        *(trade_off_row([p["name"], p["seeds"]], p) for p in front),
        "",
        "![trade-off](tradeoff.png)",
        "",
    ]
    unreplayed = f"the run config's mixture ({sweep.domain_mixture})" if sweep.domain_mixture else "no replay"
    by_replay = fronts_by_replay(results, unreplayed)
    if by_replay:
        lines += ["## Pareto front at each replay setting", "", "Methods compared at the same replay (or none): each setting's front."]
        if sweep.domain_mixture:
            lines.append(
                f"Recipes without +replay train on the run config's mixture ({sweep.domain_mixture}); +replayPCT scales "
                "its sources to (100 - PCT) % and draws PCT % from the replay corpus."
            )
        lines.append("")
        lines += ["| replay | point | seeds | general ppl increase | domain ppl drop |", "|---|---|---|---|---|"]
        lines += [trade_off_row([setting, p["name"], p["seeds"]], p) for setting, points_at in by_replay.items() for p in points_at]
        lines.append("")
    if any(curves.values()):
        lines += ["## Merged toward the base (`adept-ds merge`), mean over seeds at the best learning rate", ""]
        lines += ["| variant | alpha | general ppl increase | domain ppl drop |", "|---|---|---|---|"]
        lines += [trade_off_row([variant, f"{p['alpha']:g}"], p) for variant, curve in curves.items() for p in curve]
        lines.append("")
    lines += ["## Every learning rate", "", markdown_table(aggregate(labelled))]
    report = sweep.output / "report.md"
    report.write_text("\n".join(lines) + "\n")
    plot(points, best, curves, front, sweep.output / "tradeoff.png")
    return report


def plot(points: list[dict], best: dict[str, float], curves: dict[str, list[dict]], front: list[dict], path: Path) -> None:
    """Each recipe at its best LR (a dot) with its merges toward the base (dotted; the base itself, at 0, left out), its
    other learning rates (small crosses, same colour) and the front over all of them. The x axis spans the best points,
    their merges and the front; another LR that forgets more (a diverged one) is drawn at the right edge, with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    shown = [p["general_increase"] for p in front]
    others = {}
    for variant, curve in curves.items():
        mean = next(p for p in points if p["variant"] == variant and p["lr"] == best[variant] and p["alpha"] == 1.0)
        line = [p for p in curve if p["alpha"] > 0] or [mean]
        shown += [p["general_increase"] for p in line]
        drawn = axes.plot([p["general_increase"] for p in line], [p["domain_drop"] for p in line], ":", lw=1)[0]
        axes.scatter(
            [mean["general_increase"]], [mean["domain_drop"]], color=drawn.get_color(), s=40, label=label(variant, best[variant]), zorder=3
        )
        others[drawn.get_color()] = [p for p in points if p["variant"] == variant and p["lr"] != best[variant] and p["alpha"] == 1.0]
    low, high = min(shown), max(shown)
    pad = 0.08 * (high - low) or 1.0
    right = high + pad
    for colour, runs in others.items():
        within = [p for p in runs if p["general_increase"] <= right]
        axes.scatter([p["general_increase"] for p in within], [p["domain_drop"] for p in within], color=colour, marker="x", s=20)
        for p in runs:
            if p["general_increase"] > right:  # off the chart: at the edge, with its figure
                axes.scatter([right], [p["domain_drop"]], color=colour, marker=">", s=25)
                axes.annotate(
                    f"{p['name']}: {p['general_increase']:+.0f}",
                    (right, p["domain_drop"]),
                    fontsize=6,
                    ha="right",
                    va="bottom",
                    color=colour,
                )
    axes.set_xlim(min([low, *(p["general_increase"] for runs in others.values() for p in runs)]) - pad, right + pad / 2)
    axes.set_title("each recipe at its best LR (dots), other LRs (x); dotted: merged toward the base")
    finish_tradeoff(figure, axes, front, path)


def main_sweep(sweep: Sweep) -> int:
    try:
        report = run_sweep(sweep)
    except BudgetExceeded as err:
        print(f"adept-ds sweep: refused: {err}", file=sys.stderr)
        return 3
    print(report.read_text())
    print(f"report: {report}")
    return 0
