import json
import re

import pytest
from PIL import Image
from tiny_models import make_tiny_model

from adept_ds.cli import main as cli_main
from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
from adept_ds.model.expand import read_manifest
from adept_ds.model.families import get_family
from adept_ds.probe.auto_k import choose_k, parameter_counts
from adept_ds.probe.layers import PROBE_FORMAT

# The demo model's mask probe (30 layers): median 0.296, threshold 0.148.
DEMO_SCORES = [8.605, 3.843, 1.014, 0.232, 0.285, 0.172, 0.335, 0.236, 0.574, 0.306, 0.384, 2.487, 0.137, 0.157, 0.144]
DEMO_SCORES += [0.175, 0.1, 0.066, 0.134, 0.153, 0.186, 0.289, 0.303, 0.472, 0.612, 0.304, 0.238, 0.389, 1.265, 2.012]
LAYER, MODEL = 1000, 20000  # parameters of one layer and of the model


def choose(scores, **kwargs):
    return choose_k(scores, LAYER, MODEL, **kwargs)


@pytest.mark.parametrize(
    "scores,k,layers",
    [
        (DEMO_SCORES, 5, [12, 14, 16, 17, 18]),  # a clear cheap cluster in the middle of the stack
        ([0.9, 0.05, 0.8, 0.04, 1.0, 0.06, 0.7, 0.9], 3, [1, 3, 5]),  # median 0.75: 0.05, 0.04, 0.06 are cheap
        ([0.3] * 6, 1, [0]),  # all equal: nothing is under half the median, k = 1, ties to the lowest index
        ([1.0, 1.2, 0.2, 0.9, 1.1], 1, [2]),  # exactly one cheap layer
        ([2.0, 1.0, 4.0, 0.5, 2.0], 2, [1, 3]),  # a score equal to the threshold (1.0 = 0.5 x 2.0) is cheap
        ([4e5, 3e5, 2e3, 5e5, 1e3, 6e5], 2, [2, 4]),  # grad-style sums of |theta * g|: all positive, any scale
        ([4e-5, 3e-5, 2e-7, 5e-5, 1e-7, 6e-5], 2, [2, 4]),  # fisher-style: the same rule, scale-free
        ([0.5, -0.02, 0.4, 0.6, 0.45], 1, [1]),  # a layer that helps when bypassed is the cheapest of all
    ],
)
def test_choice_follows_the_documented_rule(scores, k, layers):
    choice = choose(scores)
    assert (choice.k, choice.layers) == (k, layers)
    assert choice.budget_copies is None and not choice.capped
    assert choice.threshold == pytest.approx(0.5 * choice.median)
    assert f"auto k = {k} of {len(scores)} layers" in choice.reason()


def test_threshold_factor_moves_the_cut():
    assert choose(DEMO_SCORES, threshold=0.6).layers == [5, 12, 13, 14, 15, 16, 17, 18, 19]  # <= 0.178: 9 layers
    with pytest.raises(ValueError, match=r"threshold 0 must be a positive number"):
        choose(DEMO_SCORES, threshold=0)


def test_non_positive_median_is_refused():
    with pytest.raises(ValueError, match=r"the median probe score is -0\.01, not positive.*give --k explicitly"):
        choose([-0.02, -0.01, 0.0, -0.03, 0.5])


def test_budget_caps_k_by_parameters_and_by_fraction():
    by_params = choose(DEMO_SCORES, budget_params=3500)  # 3 copies of 1000
    assert (by_params.k, by_params.layers, by_params.budget_copies, by_params.capped) == (3, [16, 17, 18], 3, True)
    assert "budget: --budget-params 3,500 allows 3 copies of 1,000 parameters: capped k to 3" in by_params.reason()
    by_fraction = choose(DEMO_SCORES, budget_fraction=0.1)  # 2000 of 20000: 2 copies, the two least important
    assert (by_fraction.k, by_fraction.layers) == (2, [16, 17])
    assert "--budget-fraction 0.1 (2,000 of the model's 20,000 parameters) allows 2 copies" in by_fraction.reason()


def test_a_generous_budget_changes_nothing():
    for budget in ({"budget_params": 10**9}, {"budget_fraction": 5.0}, {"budget_params": 5000}):
        choice = choose(DEMO_SCORES, **budget)
        assert (choice.k, choice.layers, choice.capped) == (5, [12, 14, 16, 17, 18], False)
        assert ": not limiting" in choice.reason()


@pytest.mark.parametrize(
    "budget,message",
    [
        ({"budget_params": 999}, r"--budget-params 999 allows not even one copy: one decoder layer has 1,000 parameters"),
        ({"budget_fraction": 0.04}, r"--budget-fraction 0.04 \(800 of the model's 20,000 parameters\) allows not even one copy"),
        ({"budget_params": 0}, r"--budget-params 0 must be a positive number of parameters"),
        ({"budget_fraction": -0.1}, r"--budget-fraction -0.1 must be a positive fraction"),
        ({"budget_params": 10, "budget_fraction": 0.1}, r"give at most one budget"),
    ],
)
def test_impossible_or_bad_budgets_are_refused(budget, message):
    with pytest.raises(ValueError, match=message):
        choose(DEMO_SCORES, **budget)


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_model(tmp_path / "model", "qwen2", num_layers=6)


def test_parameter_counts_come_from_the_tensors(tiny):
    from transformers import AutoModelForCausalLM

    layer_params, model_params = parameter_counts(open_checkpoint(tiny), get_family("qwen2"))
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert layer_params == sum(p.numel() for p in model.model.layers[0].parameters())  # qwen2's q/k/v biases included
    assert model_params == sum(p.numel() for p in model.parameters())


def write_probe(path, scores, model_dir):
    """A probe result as `adept-ds probe` records it: the model's own fingerprint, so `expand` accepts it."""
    fingerprint = fingerprint_checkpoint(open_checkpoint(model_dir))
    result = {"format": PROBE_FORMAT, "method": "mask", "num_layers": len(scores), "scores": scores, "model_fingerprint": fingerprint}
    path.write_text(json.dumps(result))
    return path


def test_cli_auto_k_expands_the_chosen_layers_and_marks_the_chart(tmp_path, tiny, capsys):
    probe = write_probe(tmp_path / "probe.json", [0.9, 0.1, 0.8, 0.12, 1.0, 0.7], tiny)  # median 0.75: layers 1 and 3
    output = tmp_path / "expanded"
    assert cli_main(["expand", "--model", str(tiny), "--output", str(output), "--probe", str(probe), "--k", "auto"]) == 0
    printed = capsys.readouterr().out
    assert read_manifest(output)["expanded_layers"] == [1, 3]
    assert "auto k = 2 of 6 layers: 2 score at most 0.5 x the median 0.75 = 0.375" in printed
    assert "  layer 1: score 0.1\n  layer 3: score 0.12" in printed
    assert f"chart: {tmp_path / 'probe.png'}" in printed
    with Image.open(tmp_path / "probe.png") as chart:
        assert chart.size[0] > 100 and chart.size[1] > 100
        # The chosen layers are drawn orange (tab:orange, 255 127 14) and the threshold dashed red (antialiased).
        colors = {color: count for count, color in chart.convert("RGB").getcolors(1 << 20)}
    assert colors.get((255, 127, 14), 0) > 1000
    assert sum(count for (r, g, b), count in colors.items() if r > 150 and g < 90 and b < 90) > 200

    # A budget of one layer's parameters caps it to the least important layer.
    layer_params, _ = parameter_counts(open_checkpoint(tiny), get_family("qwen2"))
    args = ["expand", "--model", str(tiny), "--output", str(output), "--probe", str(probe), "--k", "auto", "--overwrite"]
    assert cli_main([*args, "--budget-params", str(layer_params + 1)]) == 0
    assert read_manifest(output)["expanded_layers"] == [1]
    assert "capped k to 1" in capsys.readouterr().out
    assert cli_main([*args, "--budget-params", str(layer_params - 1)]) == 2
    assert f"one decoder layer has {layer_params:,} parameters" in capsys.readouterr().err
    assert read_manifest(output)["expanded_layers"] == [1]  # the failed run left the earlier output alone


def test_cli_auto_k_argument_errors(tmp_path, tiny, capsys):
    probe = write_probe(tmp_path / "probe.json", [0.9, 0.1, 0.8, 0.12, 1.0, 0.7], tiny)
    out = ["expand", "--model", str(tiny), "--output", str(tmp_path / "out")]
    for args, message in [
        (["--uniform", "--k", "auto"], "--k auto needs --probe"),
        (["--probe", str(probe), "--k", "3", "--budget-params", "10"], "--budget-params and --budget-fraction go with --k auto"),
        (["--probe", str(probe), "--k", "many"], "expected a number of layers like 4, or auto, got 'many'"),
        (["--probe", str(probe), "--k", "auto", "--budget-params", "10", "--budget-fraction", "0.1"], "not allowed with argument"),
    ]:
        with pytest.raises(SystemExit):
            cli_main([*out, *args])
        assert re.search(re.escape(message), capsys.readouterr().err), args
    assert not (tmp_path / "out").exists()
