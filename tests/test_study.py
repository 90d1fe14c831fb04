"""The comparison harness's aggregation: mean and sample sd per variant, and the Pareto front."""

import json

import pytest

from adept_ds.evaluation.study import aggregate, markdown_table, pareto_front, plot_tradeoff, run_result


def result(variant, seed, general, domain, accuracy):
    return {"variant": variant, "seed": seed, "general_increase": general, "domain_drop": domain, "accuracy": accuracy}


RESULTS = [
    result("a", 0, 1.0, 9.0, 0.30),
    result("a", 1, 2.0, 9.5, 0.34),
    result("a", 2, 3.0, 8.5, 0.32),
    result("b", 0, -1.0, 8.0, 0.28),  # forgets least
    result("c", 0, 5.0, 9.8, 0.33),  # learns most
    result("d", 0, 4.0, 8.0, 0.20),  # beaten by a/0 on both axes
]


def test_mean_and_sample_standard_deviation_per_variant():
    table = aggregate(RESULTS)
    assert list(table) == ["a", "b", "c", "d"] and table["a"]["runs"] == 3
    assert table["a"]["general_increase"] == pytest.approx((2.0, 1.0))  # sd with n - 1
    assert table["a"]["domain_drop"] == pytest.approx((9.0, 0.5))
    assert table["a"]["accuracy"] == pytest.approx((0.32, 0.02))
    assert table["b"]["general_increase"] == (-1.0, 0.0)  # one run: sd 0
    assert "| a | 3 | +2.00 ± 1.00 | 9.00 ± 0.50 | 32.0% ± 2.0% |" in markdown_table(table)


def test_pareto_front_keeps_exactly_the_undominated_runs():
    front = {(r["variant"], r["seed"]) for r in pareto_front(RESULTS)}
    # a/1 (2.0, 9.5) is beaten by nothing: c learns more but forgets more, a/0 forgets less but learns less
    assert front == {("a", 0), ("a", 1), ("b", 0), ("c", 0)}
    tied = [result("x", 0, 1.0, 5.0, 0), result("y", 0, 1.0, 5.0, 0)]
    assert len(pareto_front(tied)) == 2  # equal points do not dominate each other


def test_run_result_and_plot(tmp_path):
    before = {"perplexity": {"general": {"perplexity": 20.0}, "domain": {"perplexity": 11.0}}, "qa": {"accuracy": 0.0}}
    after = {"perplexity": {"general": {"perplexity": 21.5}, "domain": {"perplexity": 2.5}}, "qa": {"accuracy": 0.31}}
    assert run_result("adept", 2, before, after) == result("adept", 2, 1.5, 8.5, 0.31)
    plot_tradeoff(RESULTS, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_step_time_is_shown_when_every_run_has_it(tmp_path):
    from adept_ds.evaluation.study import step_seconds

    timed = [{**r, "step_s": 2.0 + r["seed"]} for r in RESULTS if r["variant"] == "a"]
    table = aggregate(timed)
    assert table["a"]["step_s"] == pytest.approx((3.0, 1.0))
    assert "| a | 3 | +2.00 ± 1.00 | 9.00 ± 0.50 | 32.0% ± 2.0% | 3.00 ± 1.00 |" in markdown_table(table)
    assert "step s" not in markdown_table(aggregate([*timed, RESULTS[3]]))  # b has none: no column
    lines = [
        {"kind": "train", "step": step, "tokens": {"d": 100 * step}, "tokens_per_s": 100 / seconds}
        for step, seconds in enumerate((9, 2, 3, 4), 1)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert step_seconds(tmp_path) == pytest.approx(3.0)  # the median of steps 2-4; step 1 warms up
