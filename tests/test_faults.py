"""Faults injected for real into 2-rank DeepSpeed ZeRO-3 training runs on CPU (`launch/train.py`).

A rank is SIGKILLed mid-run or raises mid-step, a checkpoint write is interrupted by killing a rank
inside it, the job gets SIGTERM as Slurm preemption would deliver it, the ranks see different
filesystem states, a corpus is bad, and NaN flows through the real model from poisoned embedding
rows. Each run is then resumed and must reach the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpora import sentences, write_jsonl
from distributed import cpu_env, free_port, read_rank_results, run_deepspeed
from model_checks import load_state
from safetensors.torch import load_file, save_file
from train_setup import REPO, make_training_inputs, overrides
from transformers import AutoTokenizer

from adept_ds.data.blocks import load_blocks
from adept_ds.data.sampler import sample_order
from adept_ds.runtime.faults import RankRegistry
from adept_ds.runtime.run_log import read_records
from adept_ds.training.checkpoints import COMPLETE_MARKER, incomplete_reason

pytestmark = pytest.mark.dist

TRAIN = REPO / "launch" / "train.py"
STEPS = {"train.max_steps": 24, "train.save_interval": 4}


def launch(args: list[str], log: Path, wrapper: list[str] = (), **env: str) -> subprocess.Popen:
    """`[wrapper] deepspeed launch/train.py args` in the background, in its own process group, output to `log`."""
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [*wrapper, str(launcher), "--no_local_rank", "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), *args]
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cpu_env(**env), start_new_session=True)


def group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the launcher: a zombie still counts as a member of its process group
    try:
        os.killpg(process.pid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_until(condition, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    return len(read_records(run_dir, "train"))


def rank_pid(run_dir: Path, rank: int) -> int:
    return json.loads((run_dir / "ranks" / f"rank{rank}.json").read_text())["pid"]


def assert_same_weights(left: Path, right: Path) -> None:
    a, b = load_state(left), load_state(right)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 24-step run; `--auto-resume` in an empty output_dir simply starts it."""
    root = tmp_path_factory.mktemp("faults")
    inputs = make_training_inputs(root)
    run_dir = root / "reference"
    run_deepspeed(TRAIN, "--auto-resume", *overrides(inputs, run_dir, **STEPS))
    return inputs, run_dir


def test_a_killed_rank_ends_the_job_promptly_naming_it_and_resume_reaches_the_same_weights(reference, tmp_path):
    inputs, reference_dir = reference
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    args = overrides(inputs, run_dir, **STEPS)
    process = launch(args, log)
    wait_until(lambda: logged_steps(run_dir) >= 6, 300, process, "step 6")
    pid = rank_pid(run_dir, 1)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not group_alive(process), 90, process, "the job to end after rank 1 was killed")
    assert time.monotonic() - killed < 30
    assert process.wait() != 0
    output = log.read_text()
    assert f"rank 1 (pid {pid} on" in output and "died" in output, output[-3000:]

    resumed = run_deepspeed(TRAIN, "--resume", *args)
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert_same_weights(run_dir / "final", reference_dir / "final")


def test_a_failed_peer_is_found_from_its_record_on_any_host(tmp_path):
    """A dead pid can only be checked on its own host; a rank that failed says so in its record, which
    peers on other nodes read from the shared output_dir."""
    rank0, rank1 = RankRegistry(tmp_path, 0, 2), RankRegistry(tmp_path, 1, 2)
    assert rank0.dead_peers() == []  # rank 1's pid (ours) is alive
    rank1.failed()
    record = tmp_path / "ranks" / "rank1.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "host": "another-node"}))
    assert [(r["rank"], r["state"]) for r in rank0.dead_peers()] == [(1, "failed")]


def test_an_error_on_one_rank_ends_the_job_promptly_with_its_error_shown_once(tmp_path):
    """A RuntimeError (as a CUDA OOM) on rank 1 at step 2, while rank 0 waits in that step's ZeRO collectives:
    rank 1 prints it and exits without any collective (a teardown barrier would pair with rank 0's collective
    and hang until the watchdog), and rank 0 stops with one line naming rank 1, not a gloo traceback."""
    inputs = make_training_inputs(tmp_path)
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    process = launch(overrides(inputs, run_dir), log, ADEPT_DS_FAULT="backward:2:1:raise")
    wait_until(lambda: "RuntimeError: injected fault" in log.read_text(), 300, process, "the injected error")
    failed = time.monotonic()
    wait_until(lambda: not group_alive(process), 90, process, "the job to end after rank 1 failed")
    assert time.monotonic() - failed < 60
    assert process.wait() != 0
    output = log.read_text()
    assert output.count("RuntimeError: injected fault backward:2:1:raise") == 1 and output.count("Traceback") == 1, output[-4000:]
    assert "adept_ds: rank 1 failed; the job stops without a checkpoint" in output
    pid = rank_pid(run_dir, 1)
    assert f"rank 0: stopping because rank 1 (pid {pid} on" in output and ") failed (see its error)" in output, output[-4000:]
    assert "Connection closed" not in output
    assert json.loads((run_dir / "ranks" / "rank1.json").read_text())["state"] == "failed"


def test_an_error_in_a_world_of_one_is_an_ordinary_exception(tmp_path):
    """One process has no peer waiting in a collective: its error propagates (a library caller can catch it)
    instead of the fail-fast exit, and its record is not marked failed."""
    inputs = make_training_inputs(tmp_path)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "adept_ds.train", *overrides(inputs, run_dir, **{"train.max_steps": 3})]
    done = subprocess.run(command, capture_output=True, text=True, env=cpu_env(ADEPT_DS_FAULT="backward:2:0:raise"), timeout=300)
    assert done.returncode != 0
    assert "RuntimeError: injected fault backward:2:0:raise" in done.stderr, done.stderr[-3000:]
    assert "the job stops without a checkpoint" not in done.stderr
    assert json.loads((run_dir / "ranks" / "rank0.json").read_text())["state"] != "failed"


@pytest.mark.parametrize(
    "content,message",
    [(b"{not json\n", "cannot read corpus"), (b'{"text": "caf\xe9"}\n', "byte 13 (b'\\xe9') is not UTF-8")],
    ids=["not JSON", "not UTF-8"],  # an empty file: each rank finds it itself, before any preparing
)
def test_a_bad_corpus_stops_every_rank_before_the_process_group_with_one_line(tmp_path, content, message):
    """Rank 0 prepares the corpus and finds the problem; rank 1, waiting on the filesystem, raises the same error
    (or is ended by the launcher first): nobody waits in a collective, so no gloo traceback buries it."""
    inputs = make_training_inputs(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    result = run_deepspeed(TRAIN, *overrides(inputs, tmp_path / "run", **{"data.domain": bad}), check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    errors = [line for line in output.splitlines() if "train: error:" in line]  # after an unfinished progress bar
    assert errors and all(message in line for line in errors), output[-4000:]
    assert "Traceback" not in output and "Connection closed" not in output, output[-4000:]


def test_ranks_that_see_different_filesystems_follow_rank_zero(reference, tmp_path):
    """Rank 1 does not see the markers of the newest checkpoints yet (NFS, Lustre). Rank 0 answers for both
    whether to resume and from where (--auto-resume) and whether a step is already saved: both resume from
    its choice and reach the uninterrupted run's weights, with one all-reduce of the trainer's per step."""
    inputs, reference_dir = reference
    run_dir, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    for tag in ("step00000016", "step00000020"):
        shutil.copytree(reference_dir / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    args = overrides(inputs, run_dir, **STEPS)
    run_deepspeed("train_observed.py", out, "--auto-resume", *args, HIDE_ON_RANK1="step00000020,step00000024")
    ranks = read_rank_results(out, 2)
    assert [r["resumed_from"] for r in ranks] == [["step00000020"]] * 2
    assert all(r["exit_code"] == 0 and r["reduces_per_step"] == [1] * 4 for r in ranks), ranks
    assert_same_weights(run_dir / "final", reference_dir / "final")


def test_a_checkpoint_interrupted_while_written_is_ignored_and_never_becomes_latest(reference, tmp_path):
    inputs, reference_dir = reference
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    args = overrides(inputs, run_dir, **STEPS)
    # Rank 1 is SIGKILLed after writing its part of the step-8 checkpoint, before the checkpoint is sealed.
    process = launch(args, log, ADEPT_DS_FAULT="checkpoint_written:8:1")
    wait_until(lambda: not group_alive(process), 300, process, "the job to end")
    assert process.wait() != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000004"
    assert (checkpoints / "step00000008").is_dir() and not (checkpoints / "step00000008" / COMPLETE_MARKER).exists()
    assert incomplete_reason(checkpoints / "step00000004") is None

    resumed = run_deepspeed(TRAIN, "--resume", *args)
    output = resumed.stderr + resumed.stdout
    assert f"ignoring incomplete checkpoint {checkpoints / 'step00000008'}" in output
    assert f"resumed from {checkpoints / 'step00000004'}" in output
    assert_same_weights(run_dir / "final", reference_dir / "final")


@pytest.mark.parametrize("delivery", ["every process (Slurm)", "main process of run_session.sh (docker stop)"])
def test_sigterm_checkpoints_at_the_next_step_and_auto_resume_continues(reference, tmp_path, delivery):
    inputs, reference_dir = reference
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    args = overrides(inputs, run_dir, **{**STEPS, "train.save_interval": 0})  # no periodic checkpoints: only the one SIGTERM forces
    docker = "docker" in delivery
    process = launch(args, log, wrapper=[str(REPO / "launch" / "run_session.sh")] if docker else [])
    wait_until(lambda: logged_steps(run_dir) >= 5, 300, process, "step 5")
    if docker:
        process.send_signal(signal.SIGTERM)  # docker stop signals only the container's main process
        assert process.wait(timeout=90) == 143  # ...which returns once every rank has saved and exited
        assert not group_alive(process)
    else:
        os.killpg(process.pid, signal.SIGTERM)  # as Slurm signals every process of a job step
        wait_until(lambda: not group_alive(process), 90, process, "the job to stop")
    output = log.read_text()
    # run_session.sh passes the stop on as SIGUSR1: DeepSpeed's launcher would SIGKILL the ranks 30 s after a SIGTERM
    signal_name = "SIGUSR1" if docker else "SIGTERM"
    stopped = [line for line in output.splitlines() if f"stopped by {signal_name} at step" in line]
    assert stopped, output[-3000:]
    step = int(stopped[0].split("at step ")[1].split()[0])
    assert 5 <= step < 24
    checkpoint = run_dir / "checkpoints" / f"step{step:08d}"
    assert incomplete_reason(checkpoint) is None
    assert (run_dir / "checkpoints" / "latest").read_text() == checkpoint.name

    resumed = run_deepspeed(TRAIN, "--auto-resume", *args)
    assert f"resumed from {checkpoint}" in resumed.stderr + resumed.stdout
    assert_same_weights(run_dir / "final", reference_dir / "final")


# -- non-finite values --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """NaN embedding rows for '#' (in some domain documents) and '~' (in every general document)."""
    root = tmp_path_factory.mktemp("nan")
    inputs = make_training_inputs(root)
    domain = [text + (" #" if i % 12 == 5 else "") for i, text in enumerate(sentences(240, seed=1))]
    inputs["domain"] = write_jsonl(root / "poisoned_domain.jsonl", domain)
    inputs["general"] = write_jsonl(root / "poisoned_general.jsonl", [t + " ~" for t in sentences(160, seed=2)])
    tokenizer = AutoTokenizer.from_pretrained(inputs["expanded"])
    bad_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "#~"]
    for file in inputs["expanded"].glob("*.safetensors"):
        tensors = load_file(file)
        if "model.embed_tokens.weight" in tensors:
            tensors["model.embed_tokens.weight"][bad_ids] = float("nan")
            save_file(tensors, file, metadata={"format": "pt"})
    return inputs, root, bad_ids[0], tokenizer


NAN_RUN = {"train.max_steps": 8, "train.save_interval": 0, "train.gradient_accumulation_steps": 2}


def expected_skips(inputs, root, bad_id, tokenizer) -> tuple[list[int], list[int]]:
    """Stream positions of the global batches holding a '#' block, and the step each would have been."""
    blocks = load_blocks(inputs["domain"], tokenizer, 32, root / "blocks")
    poisoned_blocks = {i for i, ids in enumerate(blocks[:]) if bad_id in ids.tolist()}
    global_batch = 2 * 2 * 2
    position, step, skipped, steps = 0, 0, [], []
    while step < NAN_RUN["train.max_steps"]:
        if poisoned_blocks & set(sample_order(len(blocks), 0, position, global_batch)):
            skipped.append(position)
            steps.append(step + 1)
        else:
            step += 1
        position += global_batch
    return skipped, steps


def test_nonfinite_losses_skip_their_batch_and_nan_importance_keeps_finite_lrs(poisoned, tmp_path):
    inputs, root, bad_id, tokenizer = poisoned
    run_dir, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    result = run_deepspeed("train_observed.py", out, *overrides(inputs, run_dir, **NAN_RUN, **{"data.cache_dir": root / "blocks"}))
    skipped_positions, skipped_steps = expected_skips(inputs, root, bad_id, tokenizer)
    assert 1 <= len(skipped_positions) <= 6  # the corpus is built so that some batches, not all, are poisoned
    # The check is folded into the step's one all-reduce (2 micro-batches each), dropped batches included.
    assert all(r["reduces_per_step"] == [1] * (8 + len(skipped_positions)) for r in read_rank_results(out, 2))

    assert [r["position"] for r in read_records(run_dir, "skipped")] == skipped_positions
    assert [r["step"] for r in read_records(run_dir, "train")] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in read_records(run_dir, "train"))
    output = result.stderr + result.stdout
    assert f"non-finite loss nan at step {skipped_steps[0]}" in output and "domain blocks [" in output

    history = [json.loads(line) for line in (run_dir / "importance_history.jsonl").read_text().splitlines()]
    assert history and all(math.isnan(v) for record in history for v in record["importance"].values())
    assert all(scale == 1.0 for record in history for scale in record["scales"].values())
    final = load_state(run_dir / "final")
    assert all(torch.isfinite(t).all() for name, t in final.items() if name != "model.embed_tokens.weight")
    copied = [name for name in final if name.startswith("model.layers.2.")]
    assert any(not torch.equal(final[name], load_state(inputs["expanded"])[name]) for name in copied)  # it did train


def test_nonfinite_loss_with_stop_policy_saves_the_state_before_it_and_exits(poisoned, tmp_path):
    inputs, root, bad_id, tokenizer = poisoned
    run_dir = tmp_path / "run"
    args = overrides(inputs, run_dir, **NAN_RUN, **{"data.cache_dir": root / "blocks", "train.nonfinite": "stop"})
    result = run_deepspeed(TRAIN, *args, check=False)
    _, skipped_steps = expected_skips(inputs, root, bad_id, tokenizer)
    first_bad = skipped_steps[0]
    assert result.returncode != 0
    output = result.stderr + result.stdout
    saved = run_dir / "checkpoints" / f"step{first_bad - 1:08d}"
    assert f"non-finite loss at step {first_bad}" in output and f"after saving {saved}" in output
    assert incomplete_reason(saved) is None
    assert not (run_dir / "final").exists()


# -- checkpoints and exports on disk -------------------------------------------------------------


def test_a_truncated_checkpoint_file_makes_it_incomplete(reference, tmp_path):
    from adept_ds.training.checkpoints import newest_complete

    _, reference_dir = reference
    checkpoints = tmp_path / "checkpoints"
    for tag in ("step00000020", "step00000024"):
        shutil.copytree(reference_dir / "checkpoints" / tag, checkpoints / tag)
    victim = next((checkpoints / "step00000024").glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    newest, skipped = newest_complete(checkpoints)
    assert newest == checkpoints / "step00000020"
    assert [(path, reason.split(",")[0]) for path, reason in skipped] == [(checkpoints / "step00000024", f"{victim.name} has 100 bytes")]


def test_a_failed_export_leaves_the_previous_export_untouched(reference, tmp_path, monkeypatch):
    import adept_ds.training.export
    from adept_ds.training.export import export_checkpoint

    inputs, reference_dir = reference
    output = tmp_path / "export"
    export_checkpoint(reference_dir / "checkpoints", "step00000020", inputs["expanded"], output)
    before = load_state(output)

    def disk_full(tensors, filename, metadata=None):  # the streamed export writes each rewritten shard with save_file
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adept_ds.training.export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(reference_dir / "checkpoints", "step00000024", inputs["expanded"], output)
    after = load_state(output)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial directory left behind


def test_a_fresh_run_into_a_used_output_dir_is_refused(reference, tmp_path):
    """Without --resume, an earlier run's higher-step checkpoint would pass for this run's newest one."""
    inputs, reference_dir = reference
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir / "checkpoints", run_dir / "checkpoints")
    result = run_deepspeed(TRAIN, *overrides(inputs, run_dir, **STEPS), check=False)
    assert result.returncode == 2
    assert "holds checkpoints of an earlier run; pass --resume (or --auto-resume)" in result.stderr
    assert not (run_dir / "final").exists()
