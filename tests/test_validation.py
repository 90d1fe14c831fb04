"""Validation during training and the forgetting guard: 2 real ZeRO-3 ranks (CPU, gloo) on a tiny Llama.

A run "made to forget": full fine-tuning (pt_full) of the tiny model on digits only, at a high constant LR, while
validating on held-out sentences; its general validation loss rises (measured: +11 % at step 4, +33 % at step 6),
while a normal run at a small LR on similar text does not rise at all.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from corpora import write_jsonl
from distributed import run_deepspeed
from model_checks import load_state
from train_setup import REPO, make_training_inputs, overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from adept_ds.data.blocks import load_blocks
from adept_ds.evaluation.evaluate import corpus_loss
from adept_ds.run.config import load_run_config
from adept_ds.runtime.run_log import read_records
from adept_ds.training.checkpoints import LATEST, mark_complete, newest_complete, prune, saved_steps
from adept_ds.training.export import export_checkpoint
from adept_ds.training.guard import EXIT_GUARD, best_checkpoint, roll_back_to
from adept_ds.training.validation import validation_blocks

pytestmark = pytest.mark.dist
TRAIN = REPO / "launch" / "train.py"


def records(run_dir, kind):
    return {r["step"]: r for r in read_records(run_dir, kind)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    made = make_training_inputs(root)
    rng = random.Random(3)
    digits = [" ".join(str(rng.randint(0, 999)) for _ in range(30)) for _ in range(200)]
    return {**made, "digits": write_jsonl(root / "digits.jsonl", digits), "root": root}


def forgetting(inputs, run_dir, **extra):
    """pt_full on digits at a high LR, validated on held-out general sentences every 2 steps."""
    values = {"model": inputs["original"], "method": "pt_full", "data.domain": inputs["digits"], "optimizer.lr": 0.03}
    values |= {"scheduler.type": "constant", "eval.interval": 2, "train.max_steps": 8, "train.save_interval": 2}
    return overrides(inputs, run_dir, **{**values, **extra})


def test_validation_on_two_ranks_equals_one_process_and_a_normal_run_never_triggers_the_guard(inputs):
    run_dir = inputs["root"] / "normal"
    args = overrides(inputs, run_dir, **{"eval.interval": 3, "optimizer.lr": 1e-3, "guard.max_general_increase": 0.02})
    run_deepspeed("train_run.py", inputs["root"] / "logits.pt", *args)
    validations = records(run_dir, "validation")
    assert sorted(validations) == [0, 3, 6]  # step 0, every interval, the end
    assert not records(run_dir, "guard")
    assert (run_dir / "validation.png").stat().st_size > 0

    # Single-process evaluation (evaluate.py: whole model, its own logits) of the same blocks: the held-out tails.
    config = load_run_config(None, args)
    count = validation_blocks(config, world_size=2)
    tokenizer = AutoTokenizer.from_pretrained(inputs["expanded"])
    cache = config.block_cache()
    general = load_blocks(inputs["general"], tokenizer, 32, cache, max_tokens=config.importance.max_tokens)
    domain = load_blocks(inputs["domain"], tokenizer, 32, cache)
    held_out = {"general": general[len(general) - count : len(general)], "domain": domain[len(domain) - count : len(domain)]}
    for step, model_dir in ((0, inputs["expanded"]), (6, run_dir / "final")):  # the expansion preserves the model: step 0
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for name, blocks in held_out.items():
            measured = validations[step]["validation"][name]
            assert measured["tokens"] == count * 31
            assert measured["loss"] == pytest.approx(corpus_loss(model, blocks), rel=1e-5), (step, name)
    assert validations[6]["validation"]["domain"]["loss"] < validations[0]["validation"]["domain"]["loss"]


def test_guard_cools_keeps_the_cooled_rate_on_resume_and_stops(inputs):
    run_dir = inputs["root"] / "cool"
    guard = {"guard.max_general_increase": 0.05, "guard.action": "cool", "guard.cool_factor": 0.5}
    run_deepspeed(TRAIN, *forgetting(inputs, run_dir, **guard, **{"train.max_steps": 4}))
    triggers = records(run_dir, "guard")
    assert list(triggers) == [4] and triggers[4]["guard"]["action"] == "cool" and triggers[4]["guard"]["rise"] > 0.05
    steps = records(run_dir, "train")
    assert all(steps[s]["lr_max"] == pytest.approx(0.03) for s in (1, 2, 3, 4))

    # Resumed, the cooled LR carries on; now with action stop, which saves and stops at the next rise.
    stop = {**guard, "guard.action": "stop", "train.max_steps": 8}
    result = run_deepspeed(TRAIN, *forgetting(inputs, run_dir, **stop), "--resume", check=False)
    assert result.returncode == EXIT_GUARD, result.stdout[-3000:]
    output = result.stdout + result.stderr
    assert "forgetting guard: general validation loss" in output and "and stopped" in output
    steps = records(run_dir, "train")
    assert all(steps[s]["lr_multiplier"] == 0.5 and steps[s]["lr_max"] == pytest.approx(0.015) for s in (5, 6))
    triggers = records(run_dir, "guard")
    assert list(triggers) == [4, 6] and triggers[6]["guard"]["action"] == "stop"
    assert newest_complete(run_dir / "checkpoints")[0].name == "step00000006"  # saved at the stop
    exported = json.loads((run_dir / "final" / "adept_export.json").read_text())["checkpoint"]
    assert exported.endswith("step00000004")  # the first run's export; a guard stop exports nothing


def test_guard_rollback_exports_the_best_checkpoint_and_resume_starts_there(inputs):
    run_dir = inputs["root"] / "rollback"
    guard = {"guard.max_general_increase": 0.2, "guard.action": "rollback", "train.keep_checkpoints": 1}
    result = run_deepspeed(TRAIN, *forgetting(inputs, run_dir, **guard, **{"train.save_interval": 2}), check=False)
    assert result.returncode == EXIT_GUARD, result.stdout[-3000:]
    validations = records(run_dir, "validation")
    rise = {s: r["validation"]["general"]["loss"] / validations[0]["validation"]["general"]["loss"] - 1 for s, r in validations.items()}
    assert rise[2] < 0.2 and rise[4] < 0.2 < rise[6]  # step 4 learned most within the limit; step 6 forgot
    assert "rolled back to step00000004" in result.stdout + result.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / LATEST).read_text() == "step00000004"
    assert newest_complete(checkpoints)[0].name == "step00000004"  # what --resume continues from
    reference = export_checkpoint(checkpoints, "step00000004", inputs["original"], inputs["root"] / "best_export")
    exported, best = load_state(run_dir / "final"), load_state(reference)
    assert exported.keys() == best.keys() and all(torch.equal(exported[name], best[name]) for name in best)
    # Exported by one rank after the process group ended, the other waiting on the filesystem: nothing left behind.
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("final")) == ["final"]


def test_best_checkpoint_rule_on_crafted_histories():
    history = [{"step": 0, "general": 2.0, "domain": 3.0}]
    history += [{"step": 10, "general": 2.02, "domain": 2.5}, {"step": 20, "general": 2.08, "domain": 2.2}]
    history += [{"step": 30, "general": 2.05, "domain": 2.4}, {"step": 40, "general": 2.5, "domain": 1.5}]
    # Within 5 %: steps 10 (+1 %) and 30 (+2.5 %); 30 learned more. Step 20 (+4 %) is better but was not saved.
    assert best_checkpoint(history, 0.05, {10, 30, 40})["step"] == 30
    assert best_checkpoint(history, 0.05, {10, 20, 30, 40})["step"] == 20
    # Nothing within 0.5 %: the least rise.
    assert best_checkpoint(history, 0.005, {20, 30, 40})["step"] == 30
    assert best_checkpoint(history, 0.05, set()) is None


def test_roll_back_moves_newer_checkpoints_aside_and_pruning_keeps_the_protected_one(tmp_path):
    for step in (2, 4, 6, 8):
        path = tmp_path / f"step{step:08d}"
        path.mkdir()
        (path / "weights").write_text(str(step))
        mark_complete(path, step, 2)
    (tmp_path / "universal-step00000008").mkdir()
    assert [p.name for p in prune(tmp_path, 1, protect={"step00000004"})] == ["step00000002", "step00000006"]
    assert saved_steps(tmp_path) == {4, 8}
    moved = roll_back_to(tmp_path, "step00000004")
    assert sorted(p.name for p in moved) == ["step00000008", "universal-step00000008"]
    assert (tmp_path / "rolled_back" / "step00000008" / "weights").read_text() == "8"  # moved, not deleted
    assert (tmp_path / LATEST).read_text() == "step00000004" and saved_steps(tmp_path) == {4}


def test_validation_size_and_bad_settings_are_explained(inputs):
    base = overrides(inputs, inputs["root"] / "unused")
    config = load_run_config(None, [*base, "eval.interval=200"])  # 4 blocks a step of 32 tokens, on 2 ranks
    assert validation_blocks(config, world_size=2) == int(0.02 * 200 * 4)
    assert validation_blocks(load_run_config(None, [*base, "eval.interval=1"]), world_size=2) == 2  # one per rank
    assert validation_blocks(load_run_config(None, [*base, "eval.max_tokens=320"]), world_size=2) == 10
    with pytest.raises(ValueError, match="needs validation: set eval.interval > 0"):
        load_run_config(None, [*base, "guard.max_general_increase=0.05"])
    with pytest.raises(ValueError, match=r"guard.action='undo': choose one of stop, rollback, cool"):
        load_run_config(None, [*base, "guard.action=undo"])
    with pytest.raises(ValueError, match=r"guard.cool_factor=1.5: need a number in \(0, 1\)"):
        load_run_config(None, [*base, "guard.cool_factor=1.5"])


def test_held_out_sets_are_the_given_corpora_or_the_training_corpora_tails(inputs):
    from adept_ds.training.validation import held_out_sets

    tokenizer = AutoTokenizer.from_pretrained(inputs["expanded"])
    base = overrides(inputs, inputs["root"] / "unused", **{"eval.interval": 100})
    config = load_run_config(None, base)

    def store(path, max_tokens=None):
        return load_blocks(path, tokenizer, 32, config.block_cache(), max_tokens=max_tokens)

    domain, general = [store(inputs["domain"])], store(inputs["general"])
    held_out, sizes, probe_limit = held_out_sets(config, 2, domain, general, store)
    count = validation_blocks(config, 2)
    assert [(h.name, h.start, h.count) for h in held_out] == [
        ("general", len(general) - count, count),
        ("domain", len(domain[0]) - count, count),
    ]
    assert sizes == [len(domain[0]) - count] and probe_limit == len(general) - count  # neither trains nor probes on them

    given = load_run_config(None, [*base, f"data.general_eval={inputs['digits']}", f"data.domain_eval={inputs['digits']}"])
    held_out, sizes, probe_limit = held_out_sets(given, 2, domain, general, store)
    assert [(h.name, h.start, h.count) for h in held_out] == [("general", 0, count), ("domain", 0, count)]
    assert held_out[0].store.fingerprint == store(inputs["digits"], count * 32).fingerprint
    assert sizes == [len(domain[0])] and probe_limit is None  # the training corpora are left whole
    assert held_out_sets(load_run_config(None, [*base, "eval.interval=0"]), 2, domain, general, store) == ([], [len(domain[0])], None)
