"""Resume at another world size, for real: 2 ranks -> 1 and 1 -> 2, DeepSpeed ZeRO-3 (and ZeRO-2 2 -> 1) on CPU, gloo.

A run at the old world size is stopped at step 6 and resumed at the new one; it must then take the steps an
uninterrupted run at the new world size takes over the same global batches: the same losses, the same
importance and unit LRs, the same final weights.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from distributed import run_deepspeed
from model_checks import load_state
from train_setup import REPO, make_training_inputs, overrides

from adept_ds.runtime.run_log import read_records
from adept_ds.training.lr import lr_scales

pytestmark = pytest.mark.dist

# The same global batches at either world size: 4 training samples and 4 probe samples per step.
WORLD_SETTINGS = {
    2: {"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1, "importance.batch_size": 2},
    1: {"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2, "importance.batch_size": 4},
}
COMMON = {"train.max_steps": 8, "optimizer.weight_decay": 0.1}  # decay differs by group (norms: 0)


def metrics(run_dir):
    return {m["step"]: m["loss"] for m in read_records(run_dir, "train")}


def train(inputs, run_dir, world, *extra, **settings):
    values = {**COMMON, **WORLD_SETTINGS[world], **settings}
    return run_deepspeed("train_run.py", run_dir / "record.pt", *extra, *overrides(inputs, run_dir, **values), num_procs=world)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Eight steps of each method at each world size, checkpoints and importance every 2 steps."""
    root = tmp_path_factory.mktemp("worlds")
    inputs = make_training_inputs(root)
    runs = {}
    for method, model in (("adept", inputs["expanded"]), ("pt_full", inputs["original"])):
        for world in (2, 1):
            runs[method, world] = root / f"{method}_{world}"
            train(inputs, runs[method, world], world, method=method, model=model)
    return inputs, runs, root


def resume_at(inputs, source, target, world, old_world, flag="--resume", **settings):
    """Copy `source`'s step-6 checkpoint into `target` and continue it on `world` ranks with the old run's config.

    Its unit LRs come from the importance measured at step 4 (at step 2 the copies' importance is still 0
    everywhere: their residual outputs have not left zero yet under the warm-up)."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step00000006", target / "checkpoints" / "step00000006")
    values = {**COMMON, **WORLD_SETTINGS[old_world], **settings}  # as the old run was configured: re-derived
    return run_deepspeed("train_run.py", target / "record.pt", flag, *overrides(inputs, target, **values), num_procs=world)


@pytest.mark.parametrize("method", ["adept", "pt_full"])
@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2)])
def test_a_run_continues_at_another_world_size_as_if_it_had_run_there(uninterrupted, method, old_world, new_world):
    inputs, runs, root = uninterrupted
    model = inputs["expanded"] if method == "adept" else inputs["original"]
    resumed = root / f"{method}_{old_world}to{new_world}"
    # Shrinking uses --auto-resume, as a Slurm job requeued on fewer nodes does (launch/slurm/*.sbatch).
    flag = "--auto-resume" if new_world < old_world else "--resume"
    done = resume_at(inputs, runs[method, old_world], resumed, new_world, old_world, flag, method=method, model=model)
    # One process of the job converted (with its worker processes), before any collective could wait on it.
    said = done.stdout + done.stderr
    assert said.count("converting it to a universal checkpoint") == 1 and "workers, before the process group started)" in said
    assert f"resume on {new_world} ranks: global batch 4" in said
    reference = runs[method, new_world]
    continued, expected = metrics(resumed), metrics(reference)
    assert sorted(continued) == [7, 8]
    for step in (7, 8):
        assert continued[step] == pytest.approx(expected[step], rel=1e-5), step
    assert not list((resumed / "checkpoints").glob("*universal*"))  # the conversion went once step 8 was saved
    after, want = load_state(resumed / "final"), load_state(reference / "final")
    for name, tensor in want.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    started = torch.load(resumed / "record.pt", weights_only=False)["started"]
    assert started["step"] == 6
    assert started["adam_steps"] == [6.0]  # AdamW's counters restored, one per group, not shared
    assert started["adam_step_objects"] == len(started["lrs"])
    reference_start = torch.load(runs[method, old_world] / "record.pt", weights_only=False)["started"]
    assert started["weight_decays"] == reference_start["weight_decays"]  # each group's own, not group 0's
    if method == "adept":
        # The unit LRs in force right after the resume: 2 (1 - I_norm) lr_base(t), from the importance measured before it.
        history = {r["step"]: r for r in map(json.loads, (runs[method, old_world] / "importance_history.jsonl").read_text().splitlines())}
        importance = list(history[4]["importance"].values())
        assert started["importance"] == pytest.approx(importance, rel=1e-12)
        expected_lrs = [
            scale * started["base_lr"] for scale in lr_scales(importance, "linear", 2.0, "global", list(history[4]["importance"]))
        ]
        assert started["lrs"] == pytest.approx(expected_lrs, rel=1e-6)
        assert len(set(round(lr, 12) for lr in started["lrs"])) > 1  # really unit-wise
    if (method, old_world) == ("adept", 2):
        # The checkpoint after a universal resume is a regular one: the next resume (same world size) loads it as such.
        values = {**COMMON, **WORLD_SETTINGS[new_world], "train.max_steps": 10, "method": method, "model": model}
        again = run_deepspeed("train_run.py", resumed / "again.pt", "--resume", *overrides(inputs, resumed, **values), num_procs=new_world)
        assert "converting" not in again.stdout + again.stderr and "resumed from" in again.stdout + again.stderr
        assert sorted(metrics(resumed)) == [7, 8, 9, 10]
        assert torch.load(resumed / "again.pt", weights_only=False)["started"]["adam_steps"] == [8.0]


def test_zero2_resumes_at_another_world_size(uninterrupted, tmp_path):
    """ZeRO-2's universal path (per-parameter fragments, a step per group), with the copies' 18 groups: 2 ranks -> 1
    takes the steps an uninterrupted 1-rank ZeRO-2 run takes, and ends on its weights."""
    inputs, runs, root = uninterrupted
    zero2 = REPO / "ds_configs" / "zero2.json"
    old, reference = root / "zero2_2", root / "zero2_1"
    train(inputs, old, 2, deepspeed=zero2, method="adept_no_stage2")
    train(inputs, reference, 1, deepspeed=zero2, method="adept_no_stage2")
    resumed = tmp_path / "zero2_2to1"
    done = resume_at(inputs, old, resumed, 1, 2, deepspeed=zero2, method="adept_no_stage2")
    assert "converting it to a universal checkpoint" in done.stdout + done.stderr
    continued, expected = metrics(resumed), metrics(reference)
    assert sorted(continued) == [7, 8]
    for step in (7, 8):
        assert continued[step] == pytest.approx(expected[step], rel=1e-5), step
    after, want = load_state(resumed / "final"), load_state(reference / "final")
    for name, tensor in want.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    started = torch.load(resumed / "record.pt", weights_only=False)["started"]
    assert started["adam_steps"] == [6.0] and len(started["lrs"]) == 18
    assert started["weight_decays"] == torch.load(old / "record.pt", weights_only=False)["started"]["weight_decays"]


def test_an_interrupted_conversion_is_redone_and_a_finished_one_reused(uninterrupted, tmp_path):
    inputs, runs, root = uninterrupted
    from adept_ds.training.universal import MARKER, convert

    directory = tmp_path / "checkpoints"
    shutil.copytree(runs["adept", 2] / "checkpoints" / "step00000004", directory / "step00000004")
    half = directory / ".converting-step00000004-1"  # the remains of a conversion killed midway
    (half / "zero").mkdir(parents=True)
    (directory / "universal-step00000004").mkdir()  # renamed but never sealed: cannot happen, must not be trusted
    tag, converted = convert(directory, "step00000004")
    assert (tag, converted) == ("universal-step00000004", True)
    assert not half.exists() and (directory / tag / MARKER).is_file()
    assert not list(directory.glob("step*universal*")) and not (directory / "latest_universal").exists()
    assert convert(directory, "step00000004") == (tag, False)


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused(tmp_path):
    from adept_ds.run.config import load_run_config
    from adept_ds.training.checkpoints import mark_complete
    from adept_ds.training.universal import keep_global_batch

    checkpoint = tmp_path / "checkpoints" / "step00000002"
    checkpoint.mkdir(parents=True)
    mark_complete(checkpoint, 2, 2, {"global_batch": 6, "probe_batch": 6})  # a run of 2 ranks x 3 samples
    config = load_run_config(None, ["train.micro_batch_size=3", "importance.batch_size=3"])
    with pytest.raises(ValueError, match="global batch of 6 samples cannot be split evenly over 4 ranks; .*divides 6"):
        keep_global_batch(config, 4, tmp_path / "checkpoints")
    kept, notes = keep_global_batch(config, 3, tmp_path / "checkpoints")
    assert (kept.train.micro_batch_size, kept.train.gradient_accumulation_steps, kept.importance.batch_size) == (2, 1, 2)
    assert notes[0].startswith("global batch 6 = micro 2 x accumulation 1 x 3 ranks")
    assert keep_global_batch(config, 2, tmp_path / "checkpoints") == (config, [])  # the world that wrote it


def test_conversion_workers_follow_cores_rank_files_and_memory(tmp_path, monkeypatch):
    """One worker per rank file at most, as many as this process's cores, and two rank files of memory each."""
    import psutil

    from adept_ds.training import universal

    for rank in range(8):
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    monkeypatch.setattr(universal, "usable_cpus", lambda: 16)
    available = lambda size: monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=size))  # noqa: E731
    available(10**9)
    assert universal.conversion_workers(tmp_path) == 8  # the rank files bound it
    available(6_999)
    assert universal.conversion_workers(tmp_path) == 3  # 2 x 1000 bytes per worker
    available(10)
    assert universal.conversion_workers(tmp_path) == 1  # never fewer than one
    monkeypatch.setattr(universal, "usable_cpus", lambda: 2)
    available(10**9)
    assert universal.conversion_workers(tmp_path) == 2  # the cores bound it
