"""What a user's first commands meet (issue 27): DeepSpeed's --local_rank on any subcommand, no silent demo
model (`--model demo` names it: tests/test_demo_model.py), `adept-ds init` and `adept-ds train` refusing bad input in one line, and one rule for relative paths
(in a run config file: its directory; in key=value overrides: the current directory), printed by `check`."""

from __future__ import annotations

import os

import pytest
import yaml
from corpora import sentences, write_jsonl
from tiny_models import make_tiny_model

from adept_ds.cli import main, without_local_rank
from adept_ds.run.config import SHIPPED_DS_CONFIGS, load_run_config


@pytest.mark.parametrize(
    "argv, kept",
    [
        (["--local_rank=1", "probe", "--model", "m"], ["probe", "--model", "m"]),  # DeepSpeed's launcher: first
        (["eval", "--local_rank", "0", "--qa", "q"], ["eval", "--qa", "q"]),
        (["make-probe-corpus", "--local-rank=3"], ["make-probe-corpus"]),
        (["probe", "--model", "m"], ["probe", "--model", "m"]),
    ],
)
def test_the_launchers_local_rank_argument_is_dropped_anywhere(argv, kept):
    assert without_local_rank(argv) == kept


@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["sweep", "run.yaml", "a=1", "--steps", "3", "b.c=2"], ["run.yaml", "a=1", "b.c=2"]),  # the usage line's order
        (["train", "run.yaml", "--num-gpus", "2", "train.lr=1e-4"], ["run.yaml", "train.lr=1e-4"]),
        (["check", "--device", "cpu", "run.yaml"], ["run.yaml"]),
    ],
)
def test_overrides_after_the_options_join_the_overrides(argv, overrides):
    from adept_ds.cli import build_parser, parse_command_line

    assert parse_command_line(build_parser(), argv).overrides == overrides


@pytest.mark.parametrize(
    "argv, unknown",
    [(["sweep", "run.yaml", "--stpes", "3"], "--stpes 3"), (["probe", "--data", "d", "--output", "o", "a=1"], "a=1")],  # probe takes none
)
def test_unknown_arguments_are_still_refused(argv, unknown, capsys):
    from adept_ds.cli import build_parser, parse_command_line

    with pytest.raises(SystemExit) as exit:
        parse_command_line(build_parser(), argv)
    assert exit.value.code == 2 and f"unrecognized arguments: {unknown}" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["expand", "--output", "expanded", "--layers", "1"],
        ["prepare-data", "--data", "corpus.jsonl", "--output", "store"],
        ["probe", "--data", "general.jsonl", "--output", "probe.json"],
        ["eval", "--general", "general.jsonl"],
    ],
)
def test_a_missing_model_is_an_error_that_names_the_demo_model(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "general.jsonl", sentences(4))
    write_jsonl(tmp_path / "corpus.jsonl", sentences(4))
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "--model is required: a Hugging Face checkpoint directory" in err and "give --model demo" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl", "general.jsonl"]  # nothing made


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project: my-model/ and corpora under it, a configs/ folder, and the shell in the project root."""
    make_tiny_model(tmp_path / "my-model", "llama", num_layers=2)
    write_jsonl(tmp_path / "corpus" / "domain.jsonl", sentences(40, seed=1))
    write_jsonl(tmp_path / "corpus" / "general.jsonl", sentences(40, seed=2))
    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_init_writes_a_config_that_loads_with_paths_relative_to_itself(project, capsys):
    given = ["model=my-model", "data.domain=corpus/domain.jsonl", "data.general=corpus/general.jsonl", "train.max_steps=7"]
    assert main(["init", "configs/run.yaml", *given]) == 0
    written = yaml.safe_load((project / "configs" / "run.yaml").read_text())
    assert written["model"]["path"] == "../my-model" and written["data"]["domain"] == "../corpus/domain.jsonl"  # relative to the file
    assert written["deepspeed"] == "zero3" and "# " in (project / "configs" / "run.yaml").read_text()  # explained

    os.chdir(project / "corpus")  # loaded from anywhere: the file's directory is the base
    config = load_run_config(project / "configs" / "run.yaml")
    assert config.model.path == str(project / "my-model") and config.data.general == str(project / "corpus" / "general.jsonl")
    assert config.deepspeed == str(SHIPPED_DS_CONFIGS / "zero3.json") and config.train.max_steps == 7
    os.chdir(project)

    assert main(["init", "configs/run.yaml"]) == 2
    assert "configs/run.yaml exists; pass --force to replace it" in one_line_error(capsys)
    assert main(["init", "other.yaml", "train.max_stepz=3"]) == 2
    assert "max_stepz" in one_line_error(capsys) and not (project / "other.yaml").exists()


def test_overrides_are_relative_to_the_current_directory_and_check_prints_every_resolved_path(project, capsys):
    (project / "configs" / "run.yaml").write_text(
        "method: pt_full\nmodel: ../my-model\ndeepspeed: zero3\ndata:\n  domain: ../corpus/domain.jsonl\n  block_size: 16\n"
    )
    os.chdir(project / "corpus")
    argv = ["check", "../configs/run.yaml", "data.general=general.jsonl", "output_dir=../runs/a", "--device", "cpu", "--skip-data"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for key, path in [
        ("model.path", project / "my-model"),
        ("deepspeed", SHIPPED_DS_CONFIGS / "zero3.json"),
        ("output_dir", project / "runs" / "a"),
        ("data.domain", project / "corpus" / "domain.jsonl"),
        ("data.general", project / "corpus" / "general.jsonl"),
    ]:
        assert f"  {key}: {path}\n" in out, (key, out)
    assert "world: 1 ranks (no --hostfile or --num-gpus, so 1 rank per node was assumed" in out
    assert "attention: sdpa (model.attn_implementation=auto: on CPU); data.document_mask off\n" in out
    assert main([*argv[:4], "model.attn_implementation=flex_attention", *argv[4:]]) == 2  # refused before anything loads, in one line
    assert "model.attn_implementation=flex_attention: torch's FlexAttention has no backward on CPU" in capsys.readouterr().err


def test_train_refuses_bad_input_before_starting_any_rank(project, capsys):
    assert main(["train"]) == 2
    assert "give the run config: adept-ds train RUN.yaml" in one_line_error(capsys)
    assert main(["train", "missing.yaml", "--num-gpus", "2"]) == 2
    assert "missing.yaml" in one_line_error(capsys)
    (project / "run.yaml").write_text("model: my-model\ndata:\n  domain: corpus/nothing.jsonl\n")
    assert main(["train", "run.yaml", "--num-gpus", "2"]) == 2
    assert "nothing.jsonl" in one_line_error(capsys)
    assert main(["train", "run.yaml", "data.domain=corpus/domain.jsonl", "train.micro_batch_size=0"]) == 2
    assert "micro_batch_size" in one_line_error(capsys)
    assert not (project / "runs").exists()


def test_the_rank_entry_takes_overrides_after_its_options_too(tmp_path, capsys):
    """`deepspeed launch/train.py --config RUN.yaml a=1 --auto-resume b=2`: both overrides reach the config loader (here
    refused for the missing file), not argparse's 'unrecognized arguments'."""
    from adept_ds.train import main as rank_main

    try:
        rank_main(["--config", str(tmp_path / "missing.yaml"), "a=1", "--auto-resume", "b=2"])
    except SystemExit:
        pass
    err = capsys.readouterr().err
    assert "missing.yaml does not exist" in err and "unrecognized" not in err, err
