"""The data layer under 2 real ranks (DeepSpeed ZeRO-3 on CPU, gloo): a mixture with general replay,
raw corpora against prepared stores, rank slices, and resume."""

import json
import shutil

import pytest
from distributed import run_deepspeed
from train_setup import make_training_inputs, overrides
from transformers import AutoTokenizer

from adept_ds.data.sampler import Mixture
from adept_ds.data.token_store import prepare_store
from adept_ds.runtime.run_log import read_records

pytestmark = pytest.mark.dist
MICRO, ACCUMULATION, WORLD = 2, 2, 2


def mixture(domain, general) -> str:
    return json.dumps([{"path": str(domain), "weight": 3}, {"path": str(general), "weight": 1, "name": "replay"}])


def run(inputs, out, domain: str, *extra: str, **settings):
    out.mkdir(parents=True, exist_ok=True)
    values = {
        "data.domain": domain,
        "importance.interval": 0,
        "train.max_steps": 4,
        "train.save_interval": 2,
        "train.micro_batch_size": MICRO,
        "train.gradient_accumulation_steps": ACCUMULATION,
        "train.export": False,
        "train.timeout_minutes": 45,
        **settings,
    }
    run_deepspeed("data_run.py", out, *extra, *overrides(inputs, out / "run", **values))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    metrics = read_records(out / "run", "train")
    return ranks, metrics


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_dist")
    inputs = make_training_inputs(root)
    ranks, metrics = run(inputs, root / "raw", mixture(inputs["domain"], inputs["general"]))
    return root, inputs, ranks, metrics


def test_ranks_take_disjoint_slices_that_make_up_the_global_batch(raw_run):
    _, _, ranks, metrics = raw_run
    sizes = ranks[0]["sizes"]
    global_batch = MICRO * ACCUMULATION * WORLD
    pairs, counts = Mixture(sizes, [3, 1], seed=0).draw([0, 0], 4 * global_batch)
    for step in range(4):
        expected = pairs[step * global_batch : (step + 1) * global_batch]
        trained = []
        for micro in range(ACCUMULATION):
            slices = [[tuple(p) for p in rank["trained_on"][step * ACCUMULATION + micro]] for rank in ranks]
            assert all(len(s) == MICRO for s in slices)
            trained += [pair for rank_slice in slices for pair in rank_slice]
        assert trained == expected and len(set(trained)) == len(trained)  # disjoint, and together the global batch
    assert ranks[0]["source_samples"] == counts == [24, 8]  # 3:1
    assert [rank["timeout_s"] for rank in ranks] == [45 * 60] * WORLD  # train.timeout_minutes reached the process group
    block = 32
    assert metrics[-1]["tokens"] == {"domain": 24 * block, "replay": 8 * block}  # logged per source


def test_prepared_stores_train_bit_identically_to_raw_corpora(raw_run):
    root, inputs, raw_ranks, raw_metrics = raw_run
    tokenizer = AutoTokenizer.from_pretrained(inputs["expanded"])
    stores = {
        name: prepare_store(inputs[name], root / f"{name}_store", tokenizer, 32, show_progress=False) for name in ("domain", "general")
    }
    ranks, metrics = run(inputs, root / "stores", mixture(stores["domain"].path, stores["general"].path))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in raw_metrics]
    assert [r["trained_on"] for r in ranks] == [r["trained_on"] for r in raw_ranks]


def test_a_resumed_mixture_continues_the_same_stream(raw_run):
    root, inputs, raw_ranks, raw_metrics = raw_run
    resumed = root / "resumed"
    (resumed / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "raw" / "run" / "checkpoints" / "step00000002", resumed / "run" / "checkpoints" / "step00000002")
    ranks, metrics = run(inputs, resumed, mixture(inputs["domain"], inputs["general"]), "--resume")
    assert [(m["step"], m["loss"], m["tokens"]) for m in metrics] == [(m["step"], m["loss"], m["tokens"]) for m in raw_metrics[2:]]
    assert [r["trained_on"] for r in ranks] == [r["trained_on"][2 * ACCUMULATION :] for r in raw_ranks]
