"""What an ADEPT step computes, checked structurally (timings are the benchmark suite's job):
backward stops at the lowest trainable layer, and only trainable tensors carry gradients and
optimizer state. A regression here (say, `enable_input_require_grads` for gradient checkpointing)
would make every step run backward through the whole network."""

import pytest
from distributed import read_rank_results, run_deepspeed
from train_setup import make_training_inputs, overrides

from adept_ds.expand import expand_checkpoint

pytestmark = pytest.mark.dist


def test_backward_stops_at_the_lowest_copy_and_frozen_tensors_have_no_optimizer_state(tmp_path):
    inputs = make_training_inputs(tmp_path)
    expanded = tmp_path / "top_expanded"  # copies after layers 2 and 3 of 4: new layers 3 and 5 of 6
    expand_checkpoint(inputs["original"], expanded, [2, 3], show_progress=False)
    out = tmp_path / "out"
    out.mkdir()
    run_deepspeed("backward_reach.py", out, *overrides({**inputs, "expanded": expanded}, tmp_path / "run", **{"train.max_steps": 1}))
    results = read_rank_results(out, world_size=2)
    for result in results:
        assert result["copied_layers"] == [3, 5]
        assert result["backward_layers"] == [3, 4, 5]  # layers 0-2 lie below every copy: no backward at all
        assert all(name.startswith(("model.layers.3.", "model.layers.5.")) for name in result["requires_grad"])
    # ZeRO-3 master weights (and so Adam state) exist for the copies only, split across the ranks.
    partition = sum(r["optimizer_partition_elements"] for r in results)
    trainable = results[0]["trainable_elements"]
    assert trainable <= partition <= trainable + 2 * 64  # padding to the ranks' alignment at most
