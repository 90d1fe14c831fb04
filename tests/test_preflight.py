"""`adept-ds check` and the pre-flight checks every rank runs before a process group exists."""

from __future__ import annotations

import json
import shutil

import pytest
from train_setup import REPO, make_training_inputs, overrides

from adept_ds.cli import main as cli_main
from adept_ds.model.expand import MANIFEST_NAME
from adept_ds.run.hostfile import read_hostfile
from adept_ds.train import main as train_main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_training_inputs(tmp_path_factory.mktemp("preflight"))


def check(capsys, *args) -> tuple[int, str]:
    code = cli_main(["check", "--device", "cpu", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_check_accepts_a_good_run_and_reports_the_batch_arithmetic(inputs, tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two workers\nworker-0 slots=4\n\nworker-1 slots=4\n")
    code, output = check(capsys, "--hostfile", hostfile, "--num-gpus", 2, *overrides(inputs, tmp_path / "run"))
    assert code == 0, output
    assert "world: 4 ranks (2 hosts" in output and "global batch 8 = micro 2 x accumulation 1 x 4 ranks" in output
    assert "owners: micro batch 2, accumulation 1, global batch 8, clipping 1.0: the run config (train.*); precision fp32: " in output
    assert "ok: nothing wrong found" in output
    assert "zero++: ZeRO++ off" in output
    # hpZ's node size on a login node: the hostfile's ranks per host (2 with --num-gpus 2), not this machine's.
    code, output = check(capsys, "--hostfile", hostfile, "--num-gpus", 2, *overrides(inputs, tmp_path / "run", **{"train.zeropp": "hpz"}))
    assert code == 0, output
    assert "zero++: ZeRO++ hpZ: secondary shards over 2 ranks (2 groups)" in output


@pytest.mark.parametrize(
    "text,message",
    [
        ("worker-0 slots=4\nworker-1 4\n", r"line 2: 'worker-1 4' is not 'HOSTNAME slots=N'"),
        ("worker-0 slots=four\n", r"line 1: 'worker-0 slots=four' is not 'HOSTNAME slots=N'"),
        ("worker-0 slots=0\n", r"line 1: 'worker-0 slots=0' gives worker-0 no slots"),
        ("worker-0 slots=2\nworker-0 slots=2\n", "line 2: worker-0 is listed twice"),
        ("# only a comment\n", "lists no hosts"),
    ],
)
def test_bad_hostfiles_name_the_line(tmp_path, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(ValueError, match=message) as refused:
        read_hostfile(hostfile)
    assert "\n" not in str(refused.value)


def test_hostfiles_are_read_as_deepspeeds_launcher_reads_them(tmp_path):
    """Tabs, several spaces and a trailing comment are fine for DeepSpeed's parser, so they are here."""
    from deepspeed.launcher.runner import _parse_hostfile

    text = "# nodes\nworker-0\tslots=8\nworker-1   slots=4   # the small one\n  worker-2 slots=2\n"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    assert read_hostfile(hostfile) == {"worker-0": 8, "worker-1": 4, "worker-2": 2} == dict(_parse_hostfile(text.splitlines()))


def test_a_missing_hostfile_is_an_error_not_a_silent_single_node_run(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_hostfile(tmp_path / "nope")


def test_batch_arithmetic_is_checked_against_the_hostfile_world_size(inputs, tmp_path, capsys):
    ds_config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds_config["train_batch_size"] = 8
    path = tmp_path / "fixed_batch.json"
    path.write_text(json.dumps(ds_config))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=3\n")
    code, output = check(capsys, "--hostfile", hostfile, *overrides(inputs, tmp_path / "run", deepspeed=path))
    assert code == 2
    assert (
        "train_batch_size=8 disagrees with the run config's global batch 6 = train.micro_batch_size 2 x train.gradient_accumulation_steps 1 x 3 ranks"
        in output
    )


def test_a_manifest_from_another_model_is_refused(inputs, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(inputs["expanded"], model)
    manifest = json.loads((model / MANIFEST_NAME).read_text())
    manifest["num_layers"] += 2
    (model / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, output = check(capsys, "--skip-data", *overrides(inputs, tmp_path / "run", model=model))
    assert code == 2
    assert "manifest describes 8 layers but the model has 6" in output


def test_a_probe_file_from_another_model_is_refused(inputs, tmp_path, capsys):
    from adept_ds.probe.layers import write_probe_result

    probe = tmp_path / "probe.json"
    result = {"format": "adept_ds.probe/1", "method": "mask", "scores": [0.1, 0.2, 0.3, 0.4], "base_loss": 5.0}
    write_probe_result(probe, {**result, "model_fingerprint": "0123abcd"})
    args = overrides(inputs, tmp_path / "run", model=inputs["original"], method="adept_no_stage1", probe=probe, k=2)
    code, output = check(capsys, "--skip-data", *args)
    assert code == 2
    assert "was measured on a different model (fingerprint 0123abcd" in output


def test_a_corpus_smaller_than_one_global_batch_is_refused(inputs, tmp_path, capsys):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "x" * 100}) + "\n")  # 101 tokens with EOS: 3 blocks of 32
    code, output = check(capsys, "--num-gpus", 2, *overrides(inputs, tmp_path / "run", **{"data.domain": tiny}))
    assert code == 2
    assert "fewer than one global batch (4 = micro 2 x accumulation 1 x 2 ranks)" in output


def test_train_rejects_bad_input_before_any_process_group(inputs, tmp_path, capsys):
    code = train_main(overrides(inputs, tmp_path / "run", **{"train.nonfinite": "ignore"}))
    assert code == 2
    assert "train.nonfinite='ignore': choose one of skip, stop" in capsys.readouterr().err
    import torch.distributed

    assert not torch.distributed.is_initialized()


def test_check_reports_each_source_of_a_mixture_and_refuses_a_missing_one(inputs, tmp_path, capsys):
    sources = [{"path": str(inputs["domain"]), "weight": 3}, {"path": str(inputs["general"]), "weight": 1, "name": "replay"}]
    code, output = check(capsys, "--num-gpus", 2, *overrides(inputs, tmp_path / "run", **{"data.domain": json.dumps(sources)}))
    assert code == 0, output
    assert "data: domain:domain " in output and "data: domain:replay " in output and "ok: nothing wrong found" in output
    sources[1]["path"] = str(tmp_path / "gone.jsonl")
    code, output = check(capsys, "--num-gpus", 2, *overrides(inputs, tmp_path / "run", **{"data.domain": json.dumps(sources)}))
    assert code == 2 and "data.domain source 'replay'=" in output and "gone.jsonl' does not exist" in output


def test_check_says_what_validation_holds_out_and_refuses_a_split_that_leaves_too_little(inputs, tmp_path, capsys):
    run = overrides(inputs, tmp_path / "run", **{"eval.interval": 100})
    code, output = check(capsys, "--num-gpus", 2, *run)  # 2 % of 100 steps x 4 blocks: 8 blocks
    assert code == 0, output
    assert f"validation: every 100 steps, 8 blocks per corpus; general: the last blocks of {inputs['general']}" in output
    assert f"domain: the last blocks of {inputs['domain']}, not trained on" in output
    # The trainer's own split and words: the general corpus's tail first (the importance probe keeps what precedes it),
    code, output = check(capsys, *run, "eval.max_tokens=100000000")
    assert code == 2 and "data.general=" in output and "holding out 3125000 for validation leaves 0, fewer than the 1 needed" in output, (
        output
    )
    # then the domain's, which must leave one global batch.
    code, output = check(capsys, *run, "eval.max_tokens=100000000", f"data.general_eval={inputs['general']}")
    assert code == 2 and "data.domain=" in output and "holding out 3125000 for validation leaves 0, fewer than the 2 needed" in output, (
        output
    )


def test_a_block_longer_than_the_models_positions_is_refused_unless_rope_is_scaled(inputs, tmp_path, capsys):
    config = json.loads((inputs["expanded"] / "config.json").read_text())
    too_long = config["max_position_embeddings"] * 2
    code, output = check(capsys, "--skip-data", *overrides(inputs, tmp_path / "run", **{"data.block_size": too_long}))
    assert code == 2 and output.count("\n") == 1
    wanted = f"data.block_size={too_long} is longer than {inputs['expanded']}'s max_position_embeddings={config['max_position_embeddings']}"
    assert wanted in output and "rope_scaling" in output
    scaled = tmp_path / "scaled"
    shutil.copytree(inputs["expanded"], scaled)
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    code, output = check(capsys, "--skip-data", *overrides(inputs, tmp_path / "run", model=scaled, **{"data.block_size": too_long}))
    assert code == 0, output


def test_a_login_node_without_gpus_checks_the_gpu_job_its_hostfile_describes(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-node-0 slots=8\ngpu-node-1 slots=8\n")
    run = overrides(inputs, tmp_path / "run", deepspeed="zero3_bf16")
    code = cli_main(["check", "--skip-data", "--hostfile", str(hostfile), *map(str, run)])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert "device: GPU (--hostfile/--num-gpus describe a GPU job; --device cpu for CPU ranks)" in output.out
    assert "world: 16 ranks (2 hosts in" in output.out and "precision bf16" in output.out
    code = cli_main(["check", "--skip-data", "--device", "cpu", *map(str, run)])
    err = capsys.readouterr().err
    assert code == 2 and "bf16 is enabled but this run is on CPU" in err and "[checked for CPU ranks: --device cpu]" in err


def test_a_run_is_resolved_once_into_a_frozen_record_that_check_prints_and_the_trainer_takes(inputs, tmp_path, capsys):
    import dataclasses

    from transformers import AutoModelForCausalLM

    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.units import adept_units
    from adept_ds.run.config import load_run_config
    from adept_ds.training.resolve import resolve_run

    config = load_run_config(None, [*map(str, overrides(inputs, tmp_path / "run", **{"eval.interval": 2, "train.epochs": 0.5}))])
    run = resolve_run(config, 2, False, memory=8 * 2**30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.world_size = 4
    # The run as it will run: its length from the corpus (0.5 epoch of the blocks training draws), the DeepSpeed
    # config complete for 2 ranks, the layout planned for the memory given, the copies' units.
    trained = sum(run.data.domain_sizes)
    assert run.config.train.max_steps == -(-trained // 2 // 4) and config.train.max_steps == 6
    assert run.ds_config["train_batch_size"] == 4 and run.layout.memory == 8 * 2**30 and run.plan.world_size == 2
    assert run.trainable_layers == (2, 4) and run.data.held_out and len(run.data.domain[0]) - trained == run.data.held_out[1].count
    model = AutoModelForCausalLM.from_pretrained(inputs["expanded"])
    assert run.unit_names == [unit.name for unit in adept_units(model, run.family, list(run.trainable_layers))]
    assert run.resume.backbone["method"] == "adept" and run.resume.backbone["backbone_fingerprint"] == fingerprint_checkpoint(
        open_checkpoint(inputs["expanded"])
    )
    # Another memory re-plans only the layout, as the trainer does for the smallest memory of any rank.
    small = run.for_memory(2**20)
    assert small.layout.memory == 2**20 and "does not fit" in small.layout.note and small.data is run.data
    code, output = check(capsys, "--num-gpus", 2, *overrides(inputs, tmp_path / "run"))
    assert code == 0 and f"units: {len(run.unit_names)} trainable (layer2.self_attn.q_proj, " in output, output
