"""README's run command, `adept-ds demo`, as a user runs it (issue 34): the console script from the install the
README makes (`pip install -e .`), from a directory outside the checkout, with the demo's own settings
(validation during training included) but 3 steps instead of 40, through to its report (DeepSpeed's WarmupCosineLR,
the demo's, runs its first two steps at lr 0 when there are this few). The demo's fixed costs, the mask probe of 30
layers (~2.6 min on its 4,096 tokens) and evaluating two models (~2.3 min on 100 questions), are cut with its own
options: the probe on 512 tokens, 10 questions and 2048 held-out tokens a corpus, the same code on less data."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
from distributed import run_command
from installed import user_env

from adept_ds.runtime.run_log import read_records

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

NUMBER = r"(\d+\.\d+)"
ROW = re.compile(rf"^\| (\w+) \| {NUMBER}(?: \([+-]\d+\.\d+\))? \| {NUMBER}(?: \([+-]\d+\.\d+\))? \| {NUMBER}% \((\d+)/(\d+)\) \|$", re.M)


def test_demo_writes_its_report_with_tables_and_charts(demo_model_dir, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    env = user_env(Path(sys.executable).parent, tmp_path / "home", ADEPT_DS_CACHE=str(demo_model_dir.parent.parent))
    demo = "adept-ds demo --steps 3 --probe-tokens 512 --max-questions 10 --eval-tokens 2048 --output demo".split()  # README's quick look
    result = run_command(demo, timeout=1500, env=env, cwd=user)
    report = user / "demo" / "report"
    text = (report / "report.md").read_text()
    assert text in result.stdout  # the command prints its report

    rows = {row[0]: row[1:] for row in ROW.findall(text)}
    assert list(rows) == ["before", "adept"], text
    for name, (general, domain, accuracy, correct, total) in rows.items():
        assert float(general) > 1 and float(domain) > 1 and int(total) == 10 and 0 <= int(correct) <= 10, (name, text)
        assert float(accuracy) == pytest.approx(100 * int(correct) / int(total), abs=0.05)

    for chart in ("probe_importance.png", "training_loss.png", "validation_loss.png", "lr_scales.png"):
        assert f"]({chart})" in text and (report / chart).stat().st_size > 5000, chart
    results = json.loads((report / "results.json").read_text())
    assert results["settings"]["steps"] == 3 and results["settings"]["probe tokens"] == 512 and len(results["expanded_layers"]) == 4
    assert results["settings"]["eval tokens"] == 2048
    for name in rows:  # each held-out corpus scored on 2048 tokens (16 blocks of 128), not the default 8192
        assert [results["evaluations"][name]["perplexity"][c]["tokens"] for c in ("general", "domain")] == [2048, 2048]
    ppl = {name: [results["evaluations"][name]["perplexity"][c]["perplexity"] for c in ("general", "domain")] for name in rows}
    assert all(math.isfinite(value) for values in ppl.values() for value in values)
    assert ppl["adept"] != ppl["before"]  # the trained copies changed the model (by little, in 3 steps)

    run = user / "demo" / "runs" / "adept"
    assert [r["step"] for r in read_records(run, "train")] == [1, 2, 3]
    assert [r["step"] for r in read_records(run, "validation")] == [0, 1, 2, 3]  # eval.interval = max(1, steps // 5)
    assert (run / "validation.png").is_file() and (run / "final" / "config.json").is_file()


def test_demo_refuses_a_probe_or_an_evaluation_too_small(capsys):
    from adept_ds.cli import main

    assert main(["demo", "--probe-tokens", "100"]) == 2
    assert main(["demo", "--max-questions", "0"]) == 2
    assert main(["demo", "--eval-tokens", "100"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert any("demo --probe-tokens 100: need at least 512" in line for line in errors), errors
    assert any("demo --max-questions 0: need at least 1" in line for line in errors), errors
    assert any("demo --eval-tokens 100: need at least 128" in line for line in errors), errors
