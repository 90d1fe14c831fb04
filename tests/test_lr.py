import pytest
import torch
from deepspeed.runtime import lr_schedules

from adept_ds.run.config import SCHEDULERS, SchedulerConfig
from adept_ds.training.lr import ScaledScheduler, Schedule, build_base_scheduler, lr_scales


def test_linear_rule_is_the_papers():
    assert lr_scales([0.0, 1.0, 3.0]) == pytest.approx([2.0, 4 / 3, 0.0])


def test_equal_importance_gives_uniform_scales():
    assert lr_scales([0.0] * 5) == [1.0] * 5
    assert lr_scales([0.3, 0.3]) == [1.0, 1.0]


def test_power_mapping_keeps_the_endpoints_and_bends_between():
    scales = lr_scales([0.0, 0.5, 1.0], mapping="power", power=2.0)
    assert scales == pytest.approx([2.0, 0.5, 0.0])
    assert lr_scales([0.0, 0.5, 1.0], mapping="power", power=1.0) == pytest.approx(lr_scales([0.0, 0.5, 1.0]))


def test_uniform_mapping_and_non_finite_importance():
    assert lr_scales([1.0, 5.0], mapping="uniform") == [1.0, 1.0]
    with pytest.raises(ValueError, match="must be finite"):
        lr_scales([1.0, float("nan")])


def groups(num):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1} for _ in range(num)], lr=0.1)


def schedule(kind: str, **values) -> SchedulerConfig:
    return SchedulerConfig(type=kind, **{"warmup_steps": 4, "min_lr_ratio": 0.1, **values})


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_scales_survive_every_scheduler_step(kind):
    optimizer, reference = groups(3), groups(1)
    scaled = ScaledScheduler(build_base_scheduler(optimizer, schedule(kind), 0.1, 12), 3)
    base = build_base_scheduler(reference, schedule(kind), 0.1, 12)
    scaled.set_scales([2.0, 0.5, 0.0])
    for _ in range(12):
        scaled.step()
        base.step()
        lr = reference.param_groups[0]["lr"]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.0 * lr, 0.5 * lr, 0.0])
        assert scaled.base_lr() == pytest.approx(lr)
    state = scaled.state_dict()
    fresh = ScaledScheduler(build_base_scheduler(groups(3), schedule(kind), 0.1, 12), 3)
    fresh.load_state_dict(state)
    assert fresh.scales == [2.0, 0.5, 0.0]
    assert fresh.get_lr() == pytest.approx([g["lr"] for g in optimizer.param_groups])


def lrs(kind: str, total: int = 10, **values) -> list[float]:
    """lr_base / lr at scheduler steps 0..total (0: before the first optimizer step)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_base_scheduler(optimizer, schedule(kind, **values), 1.0, total)
    out = [optimizer.param_groups[0]["lr"]]
    for _ in range(total):
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_own_schedules_follow_their_formulas():
    assert lrs("constant") == [1.0] * 11  # HF's constant: no warmup
    warm = [1 / 3, 2 / 3]  # torchtitan's warmup: (t + 1) / (warmup + 1)
    assert lrs("linear", warmup_steps=2, min_lr_ratio=0.0) == pytest.approx(
        [*warm, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]
    )
    cosine = lrs("cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.55) and cosine[10] == pytest.approx(0.1)  # warmup 0: from the top
    wsd = lrs("warmup_stable_decay", warmup_steps=2, decay_ratio=0.4, min_lr_ratio=0.0)  # decay over the last 4 of 10 steps
    assert wsd == pytest.approx([*warm, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    sqrt = lrs("warmup_stable_decay", warmup_steps=0, decay_ratio=0.4, decay_type="sqrt", min_lr_ratio=0.0)
    assert sqrt[6:] == pytest.approx([1.0, 1 - 0.25**0.5, 1 - 0.5**0.5, 1 - 0.75**0.5, 0.0])
    assert lrs("linear", total=4, warmup_steps=0)[-1] == pytest.approx(0.1)  # ends at min_lr_ratio (the default here)


def test_deepspeed_schedulers_are_deepspeeds():
    assert isinstance(build_base_scheduler(groups(1), schedule("WarmupLR"), 0.1, 5), lr_schedules.WarmupLR)
    assert isinstance(build_base_scheduler(groups(1), schedule("constant"), 0.1, 5), Schedule)


NAMES = ["layer3.self_attn.q_proj", "layer3.input_layernorm", "layer5.self_attn.q_proj", "layer5.input_layernorm"]


def test_normalisations_follow_their_formulas():
    from adept_ds.training.lr import normalised_importance

    importance = [1e-7, 1e-5, 3e-7, 2e-5]  # projections tiny, norms large: the demo's pattern
    low, high = min(importance), max(importance)
    assert normalised_importance(importance, "global") == pytest.approx([(v - low) / (high - low) for v in importance])
    # per_type: q_proj with q_proj, norm with norm
    assert normalised_importance(importance, "per_type", NAMES) == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert normalised_importance([5.0, 1.0, 5.0, 3.0], "per_type", NAMES) == pytest.approx([0.5, 0.0, 0.5, 1.0])  # equal q_proj: 1/2
    # rank: evenly spread, ties share their mean rank
    assert normalised_importance(importance, "rank") == pytest.approx([0.0, 2 / 3, 1 / 3, 1.0])
    assert normalised_importance([2.0, 1.0, 2.0, 7.0], "rank") == pytest.approx([0.5, 0.0, 0.5, 1.0])
    assert lr_scales(importance, normalize="rank") == pytest.approx([2.0, 2 / 3, 4 / 3, 0.0])
    assert lr_scales(importance, "power", 2.0, "per_type", NAMES) == pytest.approx([2.0, 2.0, 0.0, 0.0])
    assert lr_scales([0.1] * 4, "power", 3.0, "rank") == [1.0] * 4  # all equal: uniform, whatever the rule
    with pytest.raises(ValueError, match="unknown importance normalisation 'minmax': choose global, per_type, rank"):
        normalised_importance(importance, "minmax")


@pytest.mark.parametrize(
    "override,message",
    [
        ("importance.normalize=minmax", r"importance.normalize='minmax': choose one of global, per_type, rank"),
        ("importance.mapping=sigmoid", r"importance.mapping='sigmoid': choose one of linear, power, uniform"),
        ("importance.power=0", r"importance.power=0: need a number > 0"),
        ("importance.power=-1.5", r"importance.power=-1.5: need a number > 0"),
    ],
)
def test_bad_importance_settings_are_refused_with_the_choices(override, message):
    from adept_ds.run.config import load_run_config

    with pytest.raises(ValueError, match=message):
        load_run_config(None, [override])
