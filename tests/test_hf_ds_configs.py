"""DeepSpeed JSONs as Hugging Face's documentation and LLaMA-Factory's examples write them ("auto" everywhere HF
Trainer fills a value, and HF's all-"auto" optimizer and scheduler sections) train unchanged on 2 real ranks
(issue 28). The files are written here from the same keys (tests/test_config.py), not copied."""

from __future__ import annotations

import json
import math

import pytest
from distributed import run_deepspeed
from test_config import HF_ZERO3, LLAMA_FACTORY_ZERO2
from train_setup import REPO, make_training_inputs, overrides

from adept_ds.runtime.run_log import read_records

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_training_inputs(tmp_path_factory.mktemp("hf_ds_configs"))


@pytest.mark.parametrize("name, ds", [("hf_zero3", HF_ZERO3), ("llama_factory_zero2", LLAMA_FACTORY_ZERO2)])
def test_hugging_face_and_llama_factory_deepspeed_jsons_train_unchanged(inputs, tmp_path, name, ds):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ds, indent=2))
    run_dir = tmp_path / "run"
    values = {"deepspeed": path, "train.max_steps": 2, "train.save_interval": 0, "train.gradient_accumulation_steps": 2}
    result = run_deepspeed(REPO / "launch" / "train.py", *overrides(inputs, run_dir, **values), timeout=300)
    losses = [record["loss"] for record in read_records(run_dir, "train")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

    used = json.loads((run_dir / "ds_config.json").read_text())
    hidden = json.loads((inputs["expanded"] / "config.json").read_text())["hidden_size"]
    assert (used["train_micro_batch_size_per_gpu"], used["gradient_accumulation_steps"], used["train_batch_size"]) == (2, 2, 8)
    assert used["bf16"]["enabled"] is False and used["fp16"]["enabled"] is False  # "auto" on CPU: fp32
    assert "optimizer" not in used and "scheduler" not in used
    if name == "hf_zero3":
        assert used["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
        assert used["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * hidden
        assert 'deepspeed config: optimizer: the JSON\'s AdamW section is all "auto"' in result.stdout
        assert f"deepspeed config: zero_optimization.reduce_bucket_size: auto = {hidden * hidden} (hidden_size^2" in result.stdout
