"""The training engine for real: 2 CPU ranks, DeepSpeed ZeRO-3 (gloo), tiny expanded Llama."""

import json
import shutil

import pytest
import torch
from distributed import read_rank_results, run_deepspeed
from model_checks import load_state
from train_setup import REPO, make_training_inputs, overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from adept_ds.data.blocks import load_blocks
from adept_ds.data.sampler import sample_order
from adept_ds.model.expand import read_manifest
from adept_ds.model.families import family_of
from adept_ds.model.units import adept_units
from adept_ds.runtime.run_log import read_records
from adept_ds.training.export import export_checkpoint

pytestmark = pytest.mark.dist


def metrics(run_dir):
    return read_records(run_dir, "train")


def importance_history(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "importance_history.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 6-step ADEPT run (importance every 2 steps, checkpoints every 2), shared by several tests."""
    root = tmp_path_factory.mktemp("engine")
    inputs = make_training_inputs(root)
    run_dir = root / "run"
    run_deepspeed("train_run.py", root / "logits.pt", *overrides(inputs, run_dir))
    return inputs, run_dir, root


def test_only_the_copies_train_and_export_matches_the_engine(trained):
    inputs, run_dir, root = trained
    before, after = load_state(inputs["expanded"]), load_state(run_dir / "final")
    assert set(before) == set(after)
    copied = read_manifest(inputs["expanded"])["copied_layers"]
    copy_prefixes = tuple(f"model.layers.{layer}." for layer in copied)
    for name, tensor in before.items():
        if name.startswith(copy_prefixes):
            continue
        assert torch.equal(after[name], tensor), f"frozen tensor {name} changed"
    changed = [name for name in before if name.startswith(copy_prefixes) and not torch.equal(after[name], before[name])]
    assert len(changed) == len([n for n in before if n.startswith(copy_prefixes)])  # every copied tensor moved
    assert after["model.layers.2.self_attn.o_proj.weight"].abs().sum() > 0

    recorded = torch.load(root / "logits.pt")
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = exported(input_ids=recorded["batch"]).logits
    torch.testing.assert_close(logits, recorded["logits"], rtol=1e-5, atol=1e-5)


def test_zero3_importance_equals_single_process_full_tensor_computation(trained):
    inputs, run_dir, root = trained
    history = importance_history(run_dir)
    assert sorted(history) == [0, 2, 4]
    assert set(history[0]["scales"].values()) == {1.0}  # zero output projections: all importances equal
    logged = history[4]["importance"]
    assert max(logged.values()) > 0

    # The weights in force at step 4, and the same general probe batches the engine drew.
    step4 = export_checkpoint(run_dir / "checkpoints", "step00000004", inputs["expanded"], root / "step4")
    model = AutoModelForCausalLM.from_pretrained(step4, dtype=torch.float32)
    blocks = load_blocks(inputs["general"], AutoTokenizer.from_pretrained(step4), 32, root / "blocks")
    world, batch_size, batches = 2, 2, 2
    per_batch = world * batch_size
    order = sample_order(len(blocks), 0 + 7919, 2 * batches * per_batch, batches * per_batch)
    abs_grad = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    for b in range(batches):
        batch = blocks[order[b * per_batch : (b + 1) * per_batch]]
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        for name, param in model.named_parameters():
            abs_grad[name] += param.grad.double().abs() / batches
    params = dict(model.named_parameters())
    units = adept_units(model, family_of(model), read_manifest(step4)["copied_layers"])
    expected = {
        unit.name: sum((params[n].detach().double().abs() * abs_grad[n]).sum().item() for n in unit.param_names)
        / sum(params[n].numel() for n in unit.param_names)
        for unit in units
    }
    assert logged.keys() == expected.keys()
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=1e-5), name


def test_resume_reproduces_the_uninterrupted_losses(trained):
    inputs, run_dir, root = trained
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    run_deepspeed("train_run.py", root / "logits_resumed.pt", "--resume", *overrides(inputs, resumed))
    uninterrupted = {m["step"]: m["loss"] for m in metrics(run_dir)}
    continued = {m["step"]: m["loss"] for m in metrics(resumed)}
    assert sorted(continued) == [3, 4, 5, 6]
    assert [continued[s] for s in range(3, 7)] == [uninterrupted[s] for s in range(3, 7)]
    assert importance_history(resumed)[4]["importance"] == importance_history(run_dir)[4]["importance"]
    torch.testing.assert_close(torch.load(root / "logits_resumed.pt")["logits"], torch.load(root / "logits.pt")["logits"], rtol=0, atol=0)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def test_checkpoints_hold_only_what_trains_and_name_their_backbone(trained):
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint

    inputs, run_dir, _ = trained
    checkpoint = run_dir / "checkpoints" / "step00000006"
    copy_prefixes = tuple(f"model.layers.{layer}." for layer in read_manifest(inputs["expanded"])["copied_layers"])
    trainable = {name: t.numel() for name, t in load_state(inputs["expanded"]).items() if name.startswith(copy_prefixes)}
    for states in checkpoint.glob("*model_states.pt"):
        state = torch.load(states, weights_only=False)
        assert not state.get("frozen_param_fragments")  # no frozen weight saved, not even a partition
        assert set(state["module"]) == set(trainable)
    # Tensor bytes: the fp32 master and Adam's two moments of the trainable weights, and nothing else.
    # (The files' fixed pickling overhead, ~30 KB per rank, dwarfs this tiny model; benchmarks/scale.py
    # measures whole files against the trainable state at 1.5B parameters.)
    trainable_state_bytes = 12 * sum(trainable.values())
    tensor_bytes = sum(_tensor_bytes(torch.load(f, weights_only=False)) for f in checkpoint.glob("*.pt"))
    assert trainable_state_bytes <= tensor_bytes <= 1.1 * trainable_state_bytes, (tensor_bytes, trainable_state_bytes)
    overhead = sum(f.stat().st_size for f in checkpoint.iterdir()) - tensor_bytes
    assert overhead < 2 * 64 * 1024, overhead
    info = json.loads((checkpoint / "complete.json").read_text())
    assert info["backbone_fingerprint"] == fingerprint_checkpoint(open_checkpoint(inputs["expanded"]))
    assert info["method"] == "adept" and len(info["units"]) == 2 * 9  # 2 copies x (7 projections + 2 norms)


def test_resume_refuses_another_backbone(trained, tmp_path):
    inputs, run_dir, _ = trained
    other = tmp_path / "other"
    shutil.copytree(inputs["expanded"], other)
    state = load_state(other)
    state["model.layers.0.self_attn.q_proj.weight"] *= 2  # a frozen weight: the checkpoint cannot tell
    from safetensors.torch import save_file

    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints", resumed / "checkpoints")
    result = run_deepspeed("train_run.py", tmp_path / "logits.pt", "--resume", *overrides(inputs, resumed, model=other), check=False)
    assert result.returncode != 0
    assert "was written for the backbone" in result.stdout + result.stderr
    assert "it resumes only on the run it came from" in result.stdout + result.stderr


def test_group_lrs_follow_the_rule_under_every_scheduler(trained, tmp_path):
    from deepspeed.runtime import lr_schedules

    inputs, _, _ = trained
    out = tmp_path / "lr"
    out.mkdir()
    args = overrides(
        inputs, out / "unused", **{"train.save_interval": 0, "train.max_steps": 7, "importance.interval": 3, "scheduler.warmup_steps": 3}
    )
    run_deepspeed("lr_readback.py", out, *args)
    report = json.loads((out / "rank0.json").read_text())["report"]
    for kind, records in report.items():
        # lr_base(t) from an independent DeepSpeed scheduler of the same kind over a dummy optimizer.
        dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        params = dict(warmup_num_steps=3, warmup_type="linear")
        base = {
            "WarmupLR": lambda: lr_schedules.WarmupLR(dummy, warmup_min_lr=0.0, warmup_max_lr=0.01, **params),
            "WarmupDecayLR": lambda: lr_schedules.WarmupDecayLR(dummy, total_num_steps=7, warmup_min_lr=0.0, warmup_max_lr=0.01, **params),
            "WarmupCosineLR": lambda: lr_schedules.WarmupCosineLR(
                dummy, total_num_steps=7, warmup_min_ratio=0.0, cos_min_ratio=0.1, **params
            ),
        }[kind]()
        non_uniform = 0
        for record in records:
            base.step()
            lr_base = dummy.param_groups[0]["lr"]
            importance = record["importance"]
            low, high = min(importance), max(importance)
            for lr, value in zip(record["group_lrs"], importance):
                scale = 1.0 if high == low else 2 * (1 - (value - low) / (high - low))
                assert lr == pytest.approx(scale * lr_base, rel=1e-9, abs=1e-15), (kind, record["step"])
            non_uniform += high > low
        assert non_uniform >= 2, kind  # the rule was exercised with real, unequal importances
        assert len(set(records[-1]["group_names"])) == len(records[-1]["group_lrs"])  # one named group per unit
        assert min(records[-1]["group_lrs"]) == 0.0  # the most important unit is frozen by the linear rule


def expected_scales(method: str, normalize: str, names: list[str], importance: list[float]) -> list[float]:
    """The documented rule, written out again here: Î by the normalisation, scale = 2 (1 - Î), matched = their mean."""
    if max(importance) == min(importance):
        return [1.0] * len(importance)

    def min_max(values):
        low, high = min(values), max(values)
        return [0.5 if high == low else (v - low) / (high - low) for v in values]

    if normalize == "global":
        normalised = min_max(importance)
    elif normalize == "rank":
        n = len(importance)
        normalised = [(sum(o < v for o in importance) + (sum(o == v for o in importance) - 1) / 2) / (n - 1) for v in importance]
    else:
        kinds = [name.split(".", 1)[1] for name in names]
        normalised = [0.0] * len(importance)
        for kind in set(kinds):
            members = [i for i, k in enumerate(kinds) if k == kind]
            for i, value in zip(members, min_max([importance[i] for i in members])):
                normalised[i] = value
    scales = [2 * (1 - value) for value in normalised]
    return [sum(scales) / len(scales)] * len(scales) if method == "adept_no_stage2_matched" else scales


NORMALISATIONS = (("adept", "per_type"), ("adept", "rank"), ("adept_no_stage2_matched", "global"))


@pytest.fixture(scope="module")
def normalisation_lrs(trained, tmp_path_factory):
    """Each (method, normalisation) trained under WarmupCosineLR, all in one job: {"method-normalize": records}."""
    inputs, _, _ = trained
    out = tmp_path_factory.mktemp("lr")
    settings = {"train.save_interval": 0, "train.max_steps": 7, "importance.interval": 3, "scheduler.warmup_steps": 3}
    variants = {f"{m}-{n}": [f"method={m}", f"importance.normalize={n}"] for m, n in NORMALISATIONS}
    run_deepspeed(
        "lr_readback.py", out, *overrides(inputs, out / "unused", **settings), SCHEDULERS="WarmupCosineLR", VARIANTS=json.dumps(variants)
    )
    report = json.loads((out / "rank0.json").read_text())["report"]
    return {name: report[f"{name}/WarmupCosineLR"] for name in variants}


@pytest.mark.parametrize("method,normalize", NORMALISATIONS)
def test_group_lrs_follow_the_chosen_normalisation_and_the_matched_ablation(normalisation_lrs, method, normalize):
    from deepspeed.runtime import lr_schedules

    records = normalisation_lrs[f"{method}-{normalize}"]
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    base = lr_schedules.WarmupCosineLR(
        dummy, total_num_steps=7, warmup_min_ratio=0.0, cos_min_ratio=0.1, warmup_num_steps=3, warmup_type="linear"
    )
    non_uniform = 0
    for record in records:
        base.step()
        scales = expected_scales(method, normalize, record["group_names"], record["importance"])
        assert record["group_lrs"] == pytest.approx([s * dummy.param_groups[0]["lr"] for s in scales], rel=1e-9, abs=1e-15)
        non_uniform += max(record["importance"]) > min(record["importance"])
    assert non_uniform >= 2  # exercised with real, unequal importances
    if method == "adept_no_stage2_matched":
        assert len(set(records[-1]["group_lrs"])) == 1 and records[-1]["group_lrs"][0] > 0  # one LR for every unit


def test_importance_pass_leaves_no_gradient_behind(trained, tmp_path):
    """With uniform LRs, recomputing importance every step must not change training at all."""
    inputs, _, _ = trained
    settings = {"importance.mapping": "uniform", "train.max_steps": 4, "train.save_interval": 0}
    runs = {name: tmp_path / name for name in ("with", "without")}
    args = [
        [str(arg) for arg in overrides(inputs, runs[name], **settings, **{"importance.interval": int(name == "with")})] for name in runs
    ]
    (tmp_path / "runs.json").write_text(json.dumps(args))
    run_deepspeed("train_each.py", tmp_path / "runs.json")  # both in one job
    assert len(importance_history(runs["with"])) == 4
    assert [m["loss"] for m in metrics(runs["with"])] == [m["loss"] for m in metrics(runs["without"])]


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero1.json", "zero3_offload.json"])
def test_other_zero_stages_train_and_measure_the_same_importance(trained, tmp_path, ds_config):
    """Every stage reads only this rank's own shares: the importance of one recompute costs exactly one
    all-reduce, of the per-unit vector, and no full-tensor collective (counted in the real run). The
    offload run also checkpoints activations: the same losses and importance as the shared run without."""
    inputs, run_dir, _ = trained
    out = tmp_path / "run"
    extra = {"deepspeed": REPO / "ds_configs" / ds_config, "train.max_steps": 4, "train.save_interval": 0}
    extra["train.activation_checkpointing"] = ds_config == "zero3_offload.json"
    run_deepspeed("count_importance_collectives.py", tmp_path / "counts", tmp_path / "logits.pt", *overrides(inputs, out, **extra))
    zero3 = importance_history(run_dir)[4 - 2]["importance"]
    assert importance_history(out)[2]["importance"] == pytest.approx(zero3, rel=1e-5)
    for counts in read_rank_results(tmp_path / "counts", 2):
        assert len(counts["recomputes"]) == len(importance_history(out))
        assert all(collectives == [["all_reduce", len(zero3)]] for collectives in counts["recomputes"]), counts["recomputes"]
        assert sum(n for name, n in counts["elsewhere"].items() if name != "barrier") > 0  # the counters see DeepSpeed's traffic
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(run_dir)][:4], rel=1e-5)
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 6


def test_export_command_writes_a_loadable_checkpoint_of_any_tag(trained, tmp_path, capsys):
    from adept_ds.cli import main as cli_main

    inputs, run_dir, _ = trained
    output = tmp_path / "step4"
    assert cli_main(["export", "--run", str(run_dir), "--tag", "step00000004", "--output", str(output)]) == 0
    assert "exported" in capsys.readouterr().out
    step4, final = load_state(output), load_state(run_dir / "final")
    assert set(step4) == set(final)
    assert not torch.equal(step4["model.layers.2.mlp.down_proj.weight"], final["model.layers.2.mlp.down_proj.weight"])
    assert AutoModelForCausalLM.from_pretrained(output).config.num_hidden_layers == 6
    assert cli_main(["export", "--run", str(run_dir), "--output", str(output)]) == 2  # exists, no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli_main(["export", "--run", str(run_dir), "--tag", "step00000099", "--output", str(tmp_path / "x")]) == 2
    assert "step00000099 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_streamed_export_rewrites_only_trained_shards_and_keeps_the_dtype(trained, tmp_path):
    import filecmp

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    inputs, run_dir, _ = trained
    base = tmp_path / "base"  # the expanded model stored in bf16 across small shards, as hub models are
    AutoModelForCausalLM.from_pretrained(inputs["expanded"], dtype=torch.bfloat16).save_pretrained(base, max_shard_size="60KB")
    for item in inputs["expanded"].iterdir():  # tokenizer, expansion manifest
        if item.suffix != ".safetensors" and not (base / item.name).exists():
            shutil.copy2(item, base / item.name)
    output = export_checkpoint(run_dir / "checkpoints", "step00000006", base, tmp_path / "out", show_progress=False)

    # What export did before streaming: DeepSpeed's full consolidation over the base tensors, cast to their dtype.
    trained_fp32 = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), "step00000006", exclude_frozen_parameters=True)
    before, after = load_state(base), load_state(output)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == torch.bfloat16, name
        assert torch.equal(after[name], trained_fp32[name].to(torch.bfloat16) if name in trained_fp32 else tensor), name
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index == json.loads((base / "model.safetensors.index.json").read_text())
    record = json.loads((output / "adept_export.json").read_text())
    holding_copies = {index["weight_map"][name] for name in trained_fp32 if name in index["weight_map"]}
    assert set(record["rewritten_shards"]) == holding_copies and record["copied_shards"]
    for shard in record["copied_shards"]:  # untouched shards are byte-for-byte copies
        assert filecmp.cmp(base / shard, output / shard, shallow=False), shard


def _write_probe(path, model_dir, scores):
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.probe.layers import PROBE_FORMAT

    fingerprint = fingerprint_checkpoint(open_checkpoint(model_dir))
    path.write_text(
        json.dumps(
            {"format": PROBE_FORMAT, "method": "mask", "num_layers": len(scores), "scores": scores, "model_fingerprint": fingerprint}
        )
    )
    return path


EACH_METHOD = ("pt_full", "llama_pro", "adept_no_stage1", "adept_no_stage2")


@pytest.fixture(scope="module")
def each_method(trained, tmp_path_factory):
    """Every other method trained in one 2-rank job (tests/scripts/train_each.py): {method: (model, run_dir)}."""
    from adept_ds.model.expand import expand_checkpoint, uniform_layers

    inputs, _, _ = trained
    root = tmp_path_factory.mktemp("each_method")
    runs, args = {}, []
    for method in EACH_METHOD:
        model = {"pt_full": inputs["original"], "adept_no_stage1": inputs["original"], "adept_no_stage2": inputs["expanded"]}.get(method)
        # Warmup gives lr 0 to the first two steps, and the zero output projections shield the rest of a
        # copy until they have moved once: 5 steps make every trainable tensor move. Every method also runs
        # with activation checkpointing (pt_full: every layer; the others: from their lowest trained layer up).
        extra = {"method": method, "train.max_steps": 5, "train.save_interval": 0, "importance.interval": 1}
        extra["train.activation_checkpointing"] = True
        if method == "adept_no_stage2":  # retention, in the real engine: a checkpoint every step, the newest 2 kept
            extra.update({"train.save_interval": 1, "train.keep_checkpoints": 2})
        if method == "llama_pro":
            model = root / "uniform"
            expand_checkpoint(inputs["original"], model, uniform_layers(4, 2), show_progress=False)
        if method == "adept_no_stage1":
            extra.update(probe=_write_probe(root / "probe.json", model, [0.3, 0.1, 0.9, 0.2]), k=2)
        runs[method] = (model, root / method)
        args.append([str(arg) for arg in overrides(inputs, root / method, model=model, **extra)])
    (root / "runs.json").write_text(json.dumps(args))
    run_deepspeed("train_each.py", root / "runs.json")
    return runs


@pytest.mark.parametrize("method", EACH_METHOD)
def test_each_method_trains_exactly_its_tensors_and_exports(each_method, method):
    model, out = each_method[method]
    before, after = load_state(model), load_state(out / "final")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    if method == "pt_full":
        expected = set(before)
    else:
        layers = {"llama_pro": [2, 5], "adept_no_stage2": [2, 4], "adept_no_stage1": [1, 3]}[method]
        expected = {name for name in before if name.startswith(tuple(f"model.layers.{layer}." for layer in layers))}
    assert changed == expected
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == {"pt_full": 4, "adept_no_stage1": 4}.get(
        method, 6
    )
    history = out / "importance_history.jsonl"
    assert history.exists() == (method == "adept_no_stage1")  # adaptive LR only where the method has it
    kept = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert kept == (["step00000004", "step00000005"] if method == "adept_no_stage2" else ["step00000005"])


def test_the_planner_predicts_the_checkpoint_bytes_exactly(trained):
    from adept_ds.run.config import load_run_config
    from adept_ds.run.plan import model_shape, plan_run

    inputs, run_dir, _ = trained
    config = load_run_config(None, overrides(inputs, run_dir))
    plan = plan_run(config, model_shape(config), 2, gpu=False, device_bytes=None)
    files = sorted((run_dir / "checkpoints" / "step00000006").glob("*optim_states.pt"))
    assert len(files) == plan.checkpoint_files == 2
    # Every rank's fp32 master and moments, partitions padded to ceil(numel / 2): exactly the predicted bytes.
    assert [_tensor_bytes(torch.load(f, weights_only=False)) for f in files] == [plan.checkpoint_bytes_per_rank] * 2


def test_every_step_logs_model_tflops_and_mfu_by_the_exact_count_and_at_6n(trained):
    from adept_ds.run.config import load_run_config
    from adept_ds.run.plan import model_shape
    from adept_ds.training.resolve import run_flops

    inputs, run_dir, _ = trained
    config = load_run_config(None, overrides(inputs, run_dir))
    flops = run_flops(config, model_shape(config), 2, held_out=0)
    tokens_per_step = config.train.global_batch(2) * config.data.block_size
    records = metrics(run_dir)
    assert records and all({"tflops_per_s", "tflops_per_s_6n", "mfu", "mfu_6n"} <= set(record) for record in records)
    for record in records:
        # The same elapsed time as tokens/s, per device of 2: the step's exact FLOPs and 6N's.
        seconds = tokens_per_step / record["tokens_per_s"]
        assert record["tflops_per_s"] == pytest.approx(flops.train / seconds / 2 / 1e12, rel=1e-9)
        assert record["tflops_per_s_6n"] == pytest.approx(flops.six_n / seconds / 2 / 1e12, rel=1e-9)
        # Both against the one peak (on CPU a matmul measured at start-up); a frozen backbone does less than 6N.
        assert record["mfu"] / record["tflops_per_s"] == pytest.approx(record["mfu_6n"] / record["tflops_per_s_6n"])
        assert 0 < record["mfu"] < record["mfu_6n"]
