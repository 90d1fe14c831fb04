"""`adept-ds sweep` through the console script and DeepSpeed's real launcher on a tiny model: it measures its cost
before training and prints the estimate, trains every variant (replay honoured), evaluates, merges toward the base,
writes the report; it resumes without training again; it refuses up front a sweep over its budget; bad input is
refused in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from corpora import sentences, write_jsonl
from distributed import cpu_env
from tiny_models import make_tiny_model

from adept_ds.cli import main
from adept_ds.evaluation.sweep import best_lrs, parse_variant
from adept_ds.model.expand import expand_checkpoint
from adept_ds.runtime.run_log import read_records

SCRIPT = Path(sys.executable).parent / "adept-ds"
SWEEP = ["--num-gpus", "2", "--variants", "adept,pt_full+replay25", "--lrs", "1e-3", "--steps", "3", "--alphas", "0.5"]
SWEEP += ["--max-blocks", "4", "--calibration-steps", "2", "--output", "sweep"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's directory: a tiny base model, its expansion, corpora and a run config naming them."""
    root = tmp_path_factory.mktemp("sweep_project")
    base = make_tiny_model(root / "base", num_layers=4)
    expand_checkpoint(base, root / "expanded", [1, 2], show_progress=False)
    corpora = {name: write_jsonl(root / f"{name}.jsonl", sentences(60, seed)) for seed, name in enumerate(["domain", "general", "d_eval", "g_eval"])}
    config = {
        "model": "expanded",
        "method": "adept",
        "deepspeed": "zero3",
        "data": {"domain": "domain.jsonl", "general": "general.jsonl", "domain_eval": "d_eval.jsonl", "general_eval": "g_eval.jsonl", "block_size": 32},
        "train": {"micro_batch_size": 2, "max_steps": 10, "save_interval": 10},
        "scheduler": {"type": "constant"},
        "importance": {"interval": 1, "batches": 1, "batch_size": 2},
        "eval": {"interval": 0},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    del config["data"]["domain_eval"], config["data"]["general_eval"]
    (root / "no_eval.yaml").write_text(yaml.safe_dump(config))
    assert all(path.is_file() for path in corpora.values())
    return root


def sweep(project, *extra, check=True):
    result = subprocess.run([str(SCRIPT), "sweep", "run.yaml", *SWEEP, *extra], cwd=project, env=cpu_env(), capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.dist
def test_sweep_estimates_trains_evaluates_merges_reports_resumes_and_refuses_over_budget(project):
    first = sweep(project, "--seeds", "1")
    out = first.stdout
    estimate = out.index("[sweep] 2 runs to do x 3 steps: about")
    assert "measured adept" in out[estimate:].split("\n")[0] and "pt_full" in out[estimate:].split("\n")[0]
    assert estimate < out.index("[sweep] run 1/2")  # measured and printed before the first run trains
    output = project / "sweep"
    results = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["lr"], r["seed"]) for r in results] == [("adept", 1e-3, 0), ("pt_full+replay25", 1e-3, 0)]
    for result in results:
        alphas = [point["alpha"] for point in result["merge_curve"]]
        assert alphas == [0.0, 0.5, 1.0]
        ends = result["merge_curve"][0], result["merge_curve"][-1]
        assert ends[0]["general_increase"] == 0.0 and ends[0]["domain_drop"] == 0.0  # alpha 0 is the base
        assert ends[1]["general_increase"] == result["general_increase"] and ends[1]["domain_drop"] == result["domain_drop"]
        assert result["step_s"] > 0
    runs = output / "runs"
    assert not list((runs / "pt_full+replay25" / "lr0.001" / "seed0" / "merge").glob("alpha_*"))  # merged models deleted once scored
    # The replay run drew general text, the plain one did not; each run kept its model, not its optimizer state.
    tokens = [record["tokens"] for record in read_records(runs / "pt_full+replay25" / "lr0.001" / "seed0", "train")]
    assert tokens[-1].get("replay", 0) > 0
    plain = [record["tokens"] for record in read_records(runs / "adept" / "lr0.001" / "seed0", "train")]
    assert "replay" not in plain[-1]
    for variant in ("adept", "pt_full+replay25"):
        assert (runs / variant / "lr0.001" / "seed0" / "final" / "config.json").is_file()
        assert not (runs / variant / "lr0.001" / "seed0" / "checkpoints").exists()
    report = (output / "report.md").read_text()
    for row in ("| adept @ 0.001 | 1 |", "| pt_full+replay25 @ 0.001 | 1 |", "Pareto front", "| adept | 0.5 |"):
        assert row in report, report
    assert (output / "tradeoff.png").stat().st_size > 10_000

    # Resume: everything is done, so nothing trains or is measured again.
    again = sweep(project, "--seeds", "1")
    assert "[sweep] run" not in again.stdout and "measuring" not in again.stdout
    assert (output / "results.jsonl").read_text().count("\n") == 2
    # A run whose result line was lost (stopped while it was evaluated) is evaluated again, not trained again.
    lines = (output / "results.jsonl").read_text().splitlines()
    (output / "results.jsonl").write_text(lines[0] + "\n")
    resumed = sweep(project, "--seeds", "1")
    assert "[sweep] run 1/1: pt_full+replay25 @ 0.001, seed 0" in resumed.stdout
    assert "adept_ds.train" not in resumed.stdout and "[sweep] + " not in resumed.stdout
    assert json.loads((output / "results.jsonl").read_text().splitlines()[1])["domain_drop"] == results[1]["domain_drop"]

    # Over budget: refused before anything trains, with the estimate and what to cut.
    refused = sweep(project, "--seeds", "3", "--budget-hours", "0.001", check=False)
    assert refused.returncode == 3, refused.stderr
    assert "refused: the sweep needs about" in refused.stderr and "4 runs still to do" in refused.stderr
    assert "--budget-hours 0.001" in refused.stderr
    assert not (runs / "adept" / "lr0.001" / "seed1").exists()


def test_best_lr_is_the_largest_net_gain_over_seeds():
    results = [
        {"variant": "a", "lr": 1e-4, "seed": 0, "general_increase": 0.1, "domain_drop": 1.0},
        {"variant": "a", "lr": 1e-3, "seed": 0, "general_increase": 3.0, "domain_drop": 3.5},
        {"variant": "a", "lr": 3e-4, "seed": 0, "general_increase": 0.5, "domain_drop": 2.0},
        {"variant": "a", "lr": 3e-4, "seed": 1, "general_increase": 0.7, "domain_drop": 2.2},
    ]
    assert best_lrs(results) == {"a": 3e-4}


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
