"""`adept-ds sweep` through the console script and DeepSpeed's real launcher on a tiny model: it measures its cost
before training and prints the estimate, trains every variant (self-replay generated once and honoured), evaluates, merges toward the base,
writes the report; it resumes without training again; it refuses up front a sweep over its budget; bad input is
refused in one line."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from corpora import sentences, write_jsonl
from installed import user_env
from tiny_models import make_tiny_model

from adept_ds.cli import main
from adept_ds.evaluation.sweep import best_lrs, lrs_at_edge, parse_variant
from adept_ds.model.expand import expand_checkpoint
from adept_ds.runtime.run_log import read_records

README = Path(__file__).resolve().parent.parent / "README.md"
README_SWEEP = re.search(r"<!-- sweep -->\n```bash\n(.*?)\n```\n<!-- /sweep -->", README.read_text(), re.S).group(1)
"""The README's sweep command, run verbatim; the resume and budget checks vary its flags."""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's directory: a tiny base model, its expansion, corpora and a run config naming them."""
    root = tmp_path_factory.mktemp("sweep_project")
    base = make_tiny_model(root / "base", num_layers=4)
    expand_checkpoint(base, root / "expanded", [1, 2], show_progress=False)
    corpora = {
        name: write_jsonl(root / f"{name}.jsonl", sentences(60, seed))
        for seed, name in enumerate(["domain", "general", "d_eval", "g_eval"])
    }
    config = {
        "model": "expanded",
        "method": "adept",
        "deepspeed": "zero3",
        "data": {
            "domain": "domain.jsonl",
            "general": "general.jsonl",
            "domain_eval": "d_eval.jsonl",
            "general_eval": "g_eval.jsonl",
            "block_size": 32,
        },
        "train": {"micro_batch_size": 2, "max_steps": 10, "save_interval": 10},
        "scheduler": {"type": "constant"},
        "importance": {"interval": 1, "batches": 1, "batch_size": 2},
        "eval": {"interval": 0},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    del config["data"]["domain_eval"], config["data"]["general_eval"]
    (root / "no_eval.yaml").write_text(yaml.safe_dump(config))
    del config["data"]["general"]
    config |= {"model": "base", "method": "pt_full", "importance": {"interval": 0}}
    (root / "no_general.yaml").write_text(yaml.safe_dump(config))
    assert all(path.is_file() for path in corpora.values())
    return root


def sweep(project):
    """The README's command in a user's shell in the project (installed.user_env): the environment's console scripts first on PATH."""
    env = user_env(Path(sys.executable).parent, project / "home")
    result = subprocess.run(["bash", "-c", README_SWEEP], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.dist
def test_sweep_estimates_trains_evaluates_merges_reports_resumes_and_refuses_over_budget(project, monkeypatch, capsys):
    first = sweep(project)
    out = first.stdout
    estimate = out.index("[sweep] 2 runs to do x 3 steps: about")
    assert "measured adept" in out[estimate:].split("\n")[0] and "pt_full" in out[estimate:].split("\n")[0]
    assert estimate < out.index("[sweep] run 1/2")  # measured and printed before the first run trains
    output = project / "sweep"
    results = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["lr"], r["seed"]) for r in results] == [("adept", 1e-3, 0), ("pt_full+self_replay25", 1e-3, 0)]
    for result in results:
        alphas = [point["alpha"] for point in result["merge_curve"]]
        assert alphas == [0.0, 0.5, 1.0]
        ends = result["merge_curve"][0], result["merge_curve"][-1]
        assert ends[0]["general_increase"] == 0.0 and ends[0]["domain_drop"] == 0.0  # alpha 0 is the base
        assert ends[1]["general_increase"] == result["general_increase"] and ends[1]["domain_drop"] == result["domain_drop"]
        assert result["step_s"] > 0
    runs = output / "runs"
    assert not list((runs / "pt_full+self_replay25" / "lr0.001" / "seed0" / "merge").glob("alpha_*"))  # merged models deleted once scored
    # The self-replay run drew text the base model wrote (generated once, with its provenance manifest), the plain
    # one drew none; each run kept its model, not its optimizer state.
    (generated,) = (output / "self_replay").glob("self_generated_*.jsonl")
    assert json.loads(Path(f"{generated}.manifest.json").read_text())["model"] == str(project / "base")
    tokens = [record["tokens"] for record in read_records(runs / "pt_full+self_replay25" / "lr0.001" / "seed0", "train")]
    assert tokens[-1].get("replay", 0) > 0
    plain = [record["tokens"] for record in read_records(runs / "adept" / "lr0.001" / "seed0", "train")]
    assert "replay" not in plain[-1]
    for variant in ("adept", "pt_full+self_replay25"):
        assert (runs / variant / "lr0.001" / "seed0" / "final" / "config.json").is_file()
        assert not (runs / variant / "lr0.001" / "seed0" / "checkpoints").exists()
    report = (output / "report.md").read_text()
    for row in ("| adept @ 0.001 | 1 |", "| pt_full+self_replay25 @ 0.001 | 1 |", "Pareto front", "| adept | 0.5 |"):
        assert row in report, report
    assert (output / "tradeoff.png").stat().st_size > 10_000

    # The rest runs in this process (no console start-up): only the first command needs to be the README's.
    argv = shlex.split(README_SWEEP)[1:]
    monkeypatch.chdir(project)
    # Resume: everything is done, so nothing trains or is measured again.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "[sweep] run" not in again and "measuring" not in again
    assert (output / "results.jsonl").read_text().count("\n") == 2
    # A run whose result line was lost (stopped while it was evaluated) is evaluated again, not trained again.
    lines = (output / "results.jsonl").read_text().splitlines()
    (output / "results.jsonl").write_text(lines[0] + "\n")
    assert main(argv) == 0
    resumed = capsys.readouterr().out
    assert "[sweep] run 1/1: pt_full+self_replay25 @ 0.001, seed 0" in resumed and "[sweep] + " not in resumed
    assert json.loads((output / "results.jsonl").read_text().splitlines()[1])["domain_drop"] == results[1]["domain_drop"]

    # Over budget: refused before anything trains, with the estimate and what to cut.
    over = list(argv)
    over[over.index("--seeds") + 1], over[over.index("--budget-hours") + 1] = "3", "0.001"
    assert main(over) == 3
    refused = capsys.readouterr().err
    assert "refused: the sweep needs about" in refused and "4 runs still to do" in refused and "--budget-hours 0.001" in refused
    assert not (runs / "adept" / "lr0.001" / "seed1").exists()


def test_best_lr_is_the_largest_net_gain_over_seeds():
    results = [
        {"variant": "a", "lr": 1e-4, "seed": 0, "general_increase": 0.1, "domain_drop": 1.0},
        {"variant": "a", "lr": 1e-3, "seed": 0, "general_increase": 3.0, "domain_drop": 3.5},
        {"variant": "a", "lr": 3e-4, "seed": 0, "general_increase": 0.5, "domain_drop": 2.0},
        {"variant": "a", "lr": 3e-4, "seed": 1, "general_increase": 0.7, "domain_drop": 2.2},
    ]
    assert best_lrs(results) == {"a": 3e-4}
    assert lrs_at_edge(results, {"a": 3e-4}) == {} and lrs_at_edge(results, {"a": 1e-3}) == {"a": "highest"}
    assert lrs_at_edge(results[:1], {"a": 1e-4}) == {}  # one learning rate tried: no grid to be at the edge of


def test_the_front_holds_merges_of_every_learning_rate_not_only_the_best(tmp_path):
    """A run at a high LR merged toward the base can beat the best LR's run on both axes: it is on the front, and the
    report says the best LR is at the grid's edge."""
    from adept_ds.evaluation.sweep import Sweep, write_report

    def run(variant, lr, general, domain, curve=()):
        merge_curve = [
            {"alpha": a, "general_increase": g, "domain_drop": d} for a, g, d in [(0.0, 0.0, 0.0), *curve, (1.0, general, domain)]
        ]
        return {"variant": variant, "lr": lr, "seed": 0, "general_increase": general, "domain_drop": domain, "merge_curve": merge_curve}

    results = [
        run("adept", 1e-4, 0.5, 6.0, [(0.5, 0.2, 4.0)]),  # best by net gain (5.5)
        run("adept", 1e-3, 10.0, 9.5, [(0.5, 0.1, 8.0)]),  # net -0.5, but merged at 0.5 it beats adept @ 1e-4 on both axes
        run("pt_full", 1e-4, 5.0, 9.7, [(0.5, 1.0, 9.0)]),
        run("adept+replay25", 1e-3, 3.0, 8.5),  # dominated by PT-Full at the same replay: off that setting's front
        run("pt_full+replay25", 1e-4, 2.0, 9.8),
        run("pt_full+self_replay25", 1e-4, 4.0, 9.0),  # no other method self-replays: no front of its own
    ]
    results[1]["seed"] = 2  # 1e-3 and seed 2 came from an earlier invocation into the same output
    sweep = Sweep(tmp_path / "run.yaml", [], [], [1e-4], 1, 40, tmp_path, list, 2, {})
    report = write_report(sweep, results).read_text()
    assert "6 runs: 40 steps each, seeds 0-2, learning rates 0.0001, 0.001;" in report  # those in the results, not --lrs/--seeds
    by_replay = report.split("## Pareto front at each replay setting")[1].split("## Merged")[0]
    assert "| no replay | adept @ 0.001 merged at 0.5 | 1 | +0.10 | 8.00 |" in by_replay, by_replay
    assert "| replay25 | pt_full+replay25 @ 0.0001 | 1 | +2.00 | 9.80 |" in by_replay
    assert "| replay25 | adept+replay25" not in by_replay and "self_replay25 |" not in by_replay
    front = report.split("## Pareto front")[1].split("![")[0]
    assert "| adept @ 0.001 merged at 0.5 | 1 | +0.10 | 8.00 |" in front, front
    assert "| adept @ 0.0001 |" not in front and "| pt_full @ 0.0001 merged at 0.5 | 1 | +1.00 | 9.00 |" in front
    assert "| adept @ 0.0001 | 1 |" in report.split("## Pareto front")[0]  # the best-LR table keeps the net-gain rule
    assert "adept: its best learning rate 0.0001 is the lowest it ran at" in report
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    sweep.domain_mixture = "math 0.8, general 0.2"  # a run config that mixes general text in itself: not "no replay"
    by_replay = write_report(sweep, results).read_text().split("## Pareto front at each replay setting")[1]
    assert "| the run config's mixture (math 0.8, general 0.2) | adept @ 0.001 merged at 0.5 | 1 |" in by_replay
    assert "no replay" not in by_replay and "scales its sources to (100 - PCT) %" in by_replay
    write_report(sweep, results[2:])  # one learning rate a recipe: nothing but the best points to draw
    assert "## Pareto front" in (tmp_path / "report.md").read_text()


def test_replay_takes_its_share_from_every_domain_source_and_marks_self_generated_text(project):
    from adept_ds.cli import mixture_shares
    from adept_ds.evaluation.sweep import replay_mixture
    from adept_ds.run.config import load_run_config

    config = load_run_config(project / "run.yaml", ['data.domain=[{"path": "a.jsonl", "weight": 3}, "b.jsonl"]'])
    assert mixture_shares(config.data.domain_sources()) == "a 0.75, b 0.25"  # the report's name for the unreplayed setting
    assert mixture_shares(load_run_config(project / "run.yaml").data.domain_sources()) == ""
    mixture = json.loads(replay_mixture(config, parse_variant("adept+replay20"), "general.jsonl"))
    assert [(s["name"], s["weight"]) for s in mixture] == [("a", pytest.approx(0.6)), ("b", pytest.approx(0.2)), ("replay", 0.2)]
    assert "self_generated" not in mixture[-1]
    mixture = json.loads(replay_mixture(config, parse_variant("pt_full+self_replay5"), "self.jsonl"))
    assert mixture[-1] == {"path": "self.jsonl", "weight": 0.05, "name": "replay", "self_generated": True}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("adept", ("adept", "adept", 0.0, False, None)),
        ("adept+replay5", ("adept+replay5", "adept", 0.05, False, None)),
        ("pt_full+self_replay25@1e-4", ("pt_full+self_replay25", "pt_full", 0.25, True, 1e-4)),
        ("pt_full_replay", ("pt_full+replay25", "pt_full", 0.25, False, None)),
    ],
)
def test_variants_parse(text, expected):
    variant = parse_variant(text)
    assert (variant.name, variant.method, variant.replay, variant.self_replay, variant.lr) == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "adapt"], "variant 'adapt': unknown method 'adapt': choose one of adept,"),
        (["--variants", "adept+replay100"], "'replay100' is not replayPCT or self_replayPCT with 0 < PCT < 100"),
        (["--variants", "adept@fast"], "the learning rate after @ must be a positive number"),
        (["--variants", "adept,adept"], "names a recipe twice"),
        (["--lrs", "1e-4,x"], "--lrs '1e-4,x': need comma-separated positive learning rates"),
        (["--alphas", "0,0.5"], "each alpha strictly between 0 and 1"),
        (["--alphas", "half"], "--alphas 'half': each alpha strictly between 0 and 1"),
        (["--budget-hours", "0"], "--budget-hours 0: need a positive number of hours"),
        (
            ["no_general.yaml", "--variants", "pt_full+replay5", "--general", "g_eval.jsonl", "--domain", "d_eval.jsonl"],
            "pt_full+replay5 replay general text: set data.general",
        ),
        (["--steps", "0"], "--steps 0: need at least 1"),
        (["--general", "missing.jsonl"], "evaluation data missing.jsonl does not exist"),
        (["no_eval.yaml"], "give --general and --domain or data.general_eval in the run config"),
        (["run.yaml", "model=base", "--variants", "adept"], "adept train an expanded model, and the run config's model"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_anything_runs(project, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(project)
    positional = [item for item in argv if "=" in item or item.endswith(".yaml")] or ["run.yaml"]  # before the options
    options = [item for item in argv if item not in positional]
    assert main(["sweep", *positional, "--output", "refused", *options]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error, error
    assert not (project / "refused" / "runs").exists()


def test_replay_fronts_takes_a_tagged_sweeps_recipe_as_its_own_method(tmp_path):
    """benchmarks/replay_fronts.py: ADEPT at another k (another sweep, tagged) joins PT-Full's replay setting."""

    def run(variant, seed, general, domain):
        curve = [
            {"alpha": 0.0, "general_increase": 0.0, "domain_drop": 0.0},
            {"alpha": 0.5, "general_increase": general - 1, "domain_drop": domain - 1},
        ]
        return {
            "variant": variant,
            "lr": 1e-3,
            "seed": seed,
            "general_increase": general,
            "domain_drop": domain,
            "merge_curve": curve + [{"alpha": 1.0, "general_increase": general, "domain_drop": domain}],
        }

    study, other_k = tmp_path / "study.jsonl", tmp_path / "k8.jsonl"
    study.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [run("pt_full+replay5", 0, -4.0, 9.8), run("pt_full+replay5", 1, -5.0, 9.8), run("adept", 0, 1.0, 8.0)]
        )
    )
    other_k.write_text("".join(json.dumps(r) + "\n" for r in [run("adept+replay5", 0, -7.0, 9.0), run("adept+replay5", 1, -7.0, 9.2)]))
    command = [sys.executable, str(Path(__file__).resolve().parent.parent / "benchmarks" / "replay_fronts.py"), str(study), f"k8={other_k}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "replay5: general" in out and "no replay" not in out  # one method without replay: no front there
    front = out.split("replay5: general")[1]
    assert "k8: adept+replay5 @ 0.001 merged at 0.5 (2 seeds): -8.00 ± 0.00 / 8.100 ± 0.14" in front, out
    assert "pt_full+replay5 @ 0.001 (2 seeds): -4.50 ± 0.71 / 9.800 ± 0.00" in front
    assert "k8: adept+replay5 @ 0.001 (2 seeds)" in front  # -7.00 / 9.10: beaten by neither
