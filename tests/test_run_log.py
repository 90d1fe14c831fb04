"""metrics.jsonl holds records of several kinds (train, skipped, validation, guard, resume); every reader takes
only the kinds it needs, so a record of another kind (or of a kind a newer version writes) breaks none of them.
Issue 34: the demo's report read every record as a training step and died on the first validation record."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from adept_ds.evaluation.report import plot_losses, write_report
from adept_ds.runtime.run_log import RECORD_KINDS, RunLog, last_per_step, read_records, record_kind
from adept_ds.training.validation import plot_validation, validation_records

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from validation_cost import measure  # noqa: E402


def validation(step: int) -> dict:
    return {name: {"loss": 3.0 - step / 10, "perplexity": 20.0 - step, "tokens": 256} for name in ("general", "domain")}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory whose metrics.jsonl holds every kind the engine writes, a resumed (repeated) step, and a
    record of a kind this version does not know, written through RunLog as the engine writes them."""
    run = tmp_path / "run"
    run.mkdir()
    log = RunLog(run)
    log.validation(0, validation(0), seconds=1.5)
    for step in (1, 2, 3):
        log.metric("train", {"step": step, "loss": 4.0 - step / 10, "tokens_per_s": 100.0 * step, "lr_base": 1e-4, "tokens": 256 * step})
    log.metric("skipped", {"step": 3, "skipped": "non-finite loss", "position": 7})
    log.validation(2, validation(2), seconds=0.5)
    log.metric("guard", {"step": 3, "guard": {"general_loss": 3.1, "threshold": 3.0, "action": "halve_lr"}})
    log.metric("resume", {"step": 2, "resume": {"checkpoint": "step00000002", "world_size": 4, "universal": True}})
    for step in (3, 4):  # step 3 again, after the resume: the later record wins
        log.metric("train", {"step": step, "loss": 2.0, "tokens_per_s": 400.0, "lr_base": 1e-4, "tokens": 256 * step})
    log.validation(4, validation(4), seconds=0.5)
    log.importance({"step": 2, "scales": {"layers.1.mlp.down_proj": 1.5, "layers.1.input_layernorm": 0.5}})
    log.close()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"kind": "profile", "step": 4, "seconds": 9.0}) + "\n")  # a newer writer's kind
    return run


def test_read_records_returns_each_kind_in_file_order(run_dir):
    assert [r["step"] for r in read_records(run_dir, "train")] == [1, 2, 3, 3, 4]
    assert [r["step"] for r in read_records(run_dir, "validation")] == [0, 2, 4]
    assert [r["position"] for r in read_records(run_dir / "metrics.jsonl", "skipped")] == [7]
    assert read_records(run_dir, "guard")[0]["guard"]["action"] == "halve_lr"
    assert read_records(run_dir, "resume")[0]["resume"] == {"checkpoint": "step00000002", "world_size": 4, "universal": True}
    assert [r["loss"] for r in last_per_step(read_records(run_dir, "train"))] == [3.9, 3.8, 2.0, 2.0]
    with pytest.raises(ValueError, match=r"unknown metrics record kind 'loss': choose one of train, skipped, validation"):
        read_records(run_dir, "loss")
    assert read_records(run_dir / "missing", "train") == []


def test_records_written_before_the_kind_field_are_read_by_their_keys(tmp_path):
    old = [{"step": 0, "validation": validation(0), "seconds": 1.0}, {"step": 1, "loss": 3.0, "tokens_per_s": 1.0}]
    old += [{"step": 1, "guard": {}}, {"step": 2, "skipped": "nan", "position": 3}, {"step": 2, "profile": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [record_kind(r) for r in old] == ["validation", "train", "guard", "skipped", None]
    assert [r["step"] for r in read_records(tmp_path, "train")] == [1]


def test_every_reader_takes_only_its_kind(run_dir, tmp_path):
    plot_losses({"adept": run_dir}, tmp_path / "loss.png")  # issue 34: KeyError 'loss' on the validation record
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [r["step"] for r in validation_records(run_dir)] == [0, 2, 4]
    assert validation_records(run_dir)[-1]["general"]["loss"] == pytest.approx(2.6)
    assert plot_validation({"adept": run_dir}, tmp_path / "validation.png") and (tmp_path / "validation.png").stat().st_size > 0

    cost = measure(run_dir, interval=2, tokens_per_step=400)  # train steps (median of 2, 4/3, 1, 1 s) and validations only
    assert cost["median_step_s"] == pytest.approx(7 / 6) and cost["validation_s_step0"] == 1.5 and cost["validation_s"] == 0.5
    assert cost["validation_tokens_per_corpus"] == {"general": 256, "domain": 256}

    probe = {"method": "mask", "num_tokens": 4096, "num_layers": 4, "scores": [0.5, 0.01, 0.2, 0.02], "least_important": [1, 3, 2, 0]}
    ppl = {"general": {"perplexity": 20.0}, "domain": {"perplexity": 30.0}}
    evaluations = {"before": {"perplexity": ppl, "qa": {"accuracy": 0.1, "correct": 1, "total": 10}}, "adept": {"perplexity": ppl}}
    report = write_report(tmp_path / "report", probe, [1, 3], {"adept": run_dir}, evaluations, {"steps": 4})
    text = report.read_text()
    for chart in ("probe_importance.png", "training_loss.png", "validation_loss.png", "lr_scales.png"):
        assert f"({chart})" in text and (report.parent / chart).stat().st_size > 0


def test_every_kind_the_package_writes_is_a_known_kind():
    """A new `.metric("kind", ...)` call in the package must add its kind to RECORD_KINDS (and so to read_records)."""
    written = set()
    for source in (REPO / "adept_ds").rglob("*.py"):
        written |= set(re.findall(r"\.metric\(\s*[\"'](\w+)[\"']", source.read_text()))
    assert written <= set(RECORD_KINDS), f"kinds written but unknown to run_log.RECORD_KINDS: {written - set(RECORD_KINDS)}"
    assert written | {"validation"} == set(RECORD_KINDS)  # and every known kind has a writer (validation via RunLog.validation)
