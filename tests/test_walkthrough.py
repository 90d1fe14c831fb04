"""README's "Your own model and corpus", run verbatim as a user runs it: from a directory outside the checkout,
with adept_ds installed by `pip install .` (not editable), through the launchers it names (DeepSpeed's, without
--no_local_rank), on a tiny random model saved with a real tokenizer (the demo model's) and a domain corpus
of gzip JSONL and Parquet files."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from corpora import sentences, write_jsonl
from distributed import REPO_DIR, run_command
from installed import install_package, user_env
from tiny_models import make_tiny_model

from adept_ds.run.config import load_run_config
from adept_ds.runtime.run_log import read_records

pytestmark = [pytest.mark.dist, pytest.mark.e2e]


def readme_block(marker: str) -> str:
    text = (REPO_DIR / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert block, f"README.md has no <!-- {marker} --> block"
    return block.group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_package(tmp_path_factory.mktemp("installed"))


def users_files(work, demo_model_dir) -> None:
    """What the walkthrough says a user brings: my-model/, corpus/general.jsonl, corpus/domain/, held-out files."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    make_tiny_model(work / "my-model", "llama", num_layers=8, max_position_embeddings=1024, pad_token_id=None, **ids)
    tokenizer.save_pretrained(work / "my-model")  # the real tokenizer replaces the tiny model's byte tokenizer
    write_jsonl(work / "corpus" / "general.jsonl", sentences(600, seed=2))
    domain = [f"Question {i}: {text} Answer: {i % 7}." for i, text in enumerate(sentences(1200, seed=1))]
    (work / "corpus" / "domain").mkdir(parents=True)
    import gzip

    with gzip.open(work / "corpus" / "domain" / "part-0.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in domain[:600])
    datasets.Dataset.from_dict({"text": domain[600:]}).to_parquet(str(work / "corpus" / "domain" / "part-1.parquet"))
    write_jsonl(work / "corpus" / "heldout_general.jsonl", sentences(100, seed=3))
    write_jsonl(
        work / "corpus" / "heldout_domain.jsonl", [f"Question {i}: {t} Answer: {i % 7}." for i, t in enumerate(sentences(100, seed=4))]
    )


def test_readme_walkthrough_runs_verbatim_outside_the_checkout_on_the_installed_package(installed, demo_model_dir, tmp_path):
    work = tmp_path / "project"
    users_files(work, demo_model_dir)
    script = readme_block("walkthrough")
    result = run_command(["bash", "-euo", "pipefail", "-c", script], timeout=1200, env=user_env(installed, tmp_path / "home"), cwd=work)
    output = result.stdout + result.stderr
    assert not list(work.glob("**/ds_configs")) and not (work / "launch").exists()  # nothing of the checkout was needed

    probe = json.loads((work / "probe.json").read_text())
    assert probe["world_size"] == 2 and len(probe["scores"]) == 8  # 2 ranks under deepspeed, --local_rank and all
    manifest = json.loads((work / "my-model-adept" / "adept_expansion.json").read_text())
    assert manifest["expanded_layers"] == sorted(probe["least_important"][:4]) and manifest["num_layers"] == 12
    for store in ("domain", "general"):
        assert json.loads((work / "stores" / store / "manifest.json").read_text())["block_size"] == 512
    assert json.loads((work / "stores" / "domain" / "manifest.json").read_text())["num_documents"] == 1200  # both files

    config = load_run_config(work / "run.yaml")
    assert config.model.path == str(work / "my-model-adept") and config.data.domain == str(work / "stores" / "domain")
    assert "ok: nothing wrong found" in output and "world: 2 ranks" in output
    assert re.search(r"^train: .*: fits$", output, re.M)  # the plan

    assert f"  model.path: {work / 'my-model-adept'}\n" in output and f"  data.domain: {work / 'stores' / 'domain'}\n" in output
    assert [r["step"] for r in read_records(work / "runs" / "adept", "train")] == list(range(1, 11))
    assert [r["step"] for r in read_records(work / "runs" / "adept", "validation")] == [0, 5, 10]
    final = json.loads((work / "runs" / "adept" / "final" / "config.json").read_text())
    assert final["num_hidden_layers"] == 12 and (work / "my-model-adept-step5" / "config.json").is_file()
    before, after = (json.loads((work / f"eval_{when}.json").read_text()) for when in ("before", "after"))
    assert before["world_size"] == after["world_size"] == 2
    assert after["perplexity"]["domain"]["perplexity"] < before["perplexity"]["domain"]["perplexity"]  # it learned the domain
    shutil.rmtree(work / "runs")  # large; the rest is small
