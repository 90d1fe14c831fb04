"""Checkpoint retention and run identity on a real filesystem (no training: the directories are built by hand)."""

import json

import pytest

from adept_ds.training.checkpoints import (
    COMPLETE_MARKER,
    LATEST,
    check_same_run,
    checkpoint_tag,
    mark_complete,
    newest_complete,
    prune,
    tag_for,
)

IDENTITY = {"backbone_model": "/models/a", "backbone_fingerprint": "abc", "method": "adept", "units": ["layer3.mlp.up_proj"]}


def make_checkpoint(directory, step, complete=True):
    path = directory / f"step{step:08d}"
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    if complete:
        mark_complete(path, step, 2, IDENTITY)
    return path


def steps(directory):
    return sorted(int(p.name[4:]) for p in directory.glob("step*"))


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, step)
    assert [p.name for p in prune(tmp_path, 2)] == ["step00000010", "step00000020"]
    assert steps(tmp_path) == [30, 40]
    assert (tmp_path / LATEST).read_text() == "step00000040"
    assert prune(tmp_path, 2) == [] and steps(tmp_path) == [30, 40]


def test_a_killed_write_never_counts_nor_is_kept_instead_of_a_complete_one(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 25, complete=False)  # killed while written, older than the newest complete
    truncated = make_checkpoint(tmp_path, 28)
    (truncated / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")  # sealed, then cut short
    make_checkpoint(tmp_path, 40, complete=False)  # newer than every complete one: maybe being written
    prune(tmp_path, 2)
    assert steps(tmp_path) == [20, 30, 40]  # two complete ones kept; the in-flight 40 untouched
    assert newest_complete(tmp_path)[0].name == "step00000030"


def test_prune_finishes_a_deletion_an_earlier_kill_interrupted_and_keep_zero_keeps_all(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    (tmp_path / ".deleting-step00000005").mkdir()
    assert prune(tmp_path, 0) == []
    assert steps(tmp_path) == [10, 20, 30]
    assert not (tmp_path / ".deleting-step00000005").exists()


def test_check_same_run_names_what_differs(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 10)
    check_same_run(checkpoint, IDENTITY)
    with pytest.raises(ValueError, match=r"for the backbone 'abc', but this run has 'def' \(/models/a then, /models/b now\)"):
        check_same_run(checkpoint, {**IDENTITY, "backbone_model": "/models/b", "backbone_fingerprint": "def"})
    with pytest.raises(ValueError, match="for the method 'adept', but this run has 'pt_full'"):
        check_same_run(checkpoint, {**IDENTITY, "method": "pt_full"})
    with pytest.raises(ValueError, match="for the trained units 1 units"):
        check_same_run(checkpoint, {**IDENTITY, "units": ["a", "b"]})
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    del marker["backbone_fingerprint"]
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="records no backbone_fingerprint"):
        check_same_run(checkpoint, IDENTITY)


def test_a_tag_may_be_written_as_the_user_counts_steps():
    assert checkpoint_tag("step500") == checkpoint_tag("500") == checkpoint_tag("step00000500") == tag_for(500) == "step00000500"
    assert checkpoint_tag("universal-step4") == "universal-step4"  # other names stay as given
