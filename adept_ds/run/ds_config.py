"""A run's DeepSpeed config: the JSON the user names, checked against the run config and completed for the run.

One owner per setting. The run config owns the micro batch, gradient accumulation (so the global batch) and
gradient clipping: the trainer slices its micro-batches and counts its accumulation steps from them, so a JSON
value that disagrees would move DeepSpeed's step boundary away from the trainer's. In the JSON they may be
"auto", left out, or equal; a different value is refused, naming both. The JSON owns precision (`bf16`/`fp16`,
"auto": bf16 on a GPU, fp32 on CPU) and everything ZeRO. The optimizer and scheduler come from the run config
(every unit gets its own learning rate): a JSON section whose values are all "auto", as Hugging Face's and
LLaMA-Factory's JSONs carry them, is dropped with a line saying so; explicit values there are refused.

"auto" is filled as HF Trainer fills it, from the run config, the device and the model's hidden size h
(`reduce_bucket_size` h*h, `stage3_param_persistence_threshold` 10*h), except ZeRO-3's parameter window
(`stage3_prefetch_bucket_size`, `stage3_max_live_parameters`, `stage3_max_reuse_distance`), which adept_ds
sizes in decoder layers from the memory plan (see `resolve_ds_config`). Each rule that filled a value is
returned as a note, which `adept-ds check` and rank 0 of a run print.
"""

from __future__ import annotations

import json
from pathlib import Path

from adept_ds.run.config import RunConfig
from adept_ds.run.zeropp import apply_zeropp, check_quantized_options

DEEPSPEED_WINDOW = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}
"""DeepSpeed's defaults for ZeRO-3's parameter window, in parameters: the caps of adept_ds's "auto" values."""
WINDOW_LAYERS = {"stage3_prefetch_bucket_size": 1, "stage3_max_live_parameters": 3, "stage3_max_reuse_distance": 1}
"""The "auto" values in decoder layers: prefetch one ahead, about three gathered, release unless reused within one."""
RUN_CONFIG_OWNS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "train.gradient_clipping",
}
"""DeepSpeed keys whose value is the run config's (the run config key)."""
OPTIMIZERS = ("adam", "adamw")
"""Optimizer types a JSON may name in an all-"auto" section: adept_ds trains with AdamW (optimizer.weight_decay)."""


def window_is_auto(path: str | Path) -> bool:
    """The DeepSpeed config leaves (some of) ZeRO-3's parameter window to adept_ds ("auto")."""
    zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    return any(zero.get(key) == "auto" for key in DEEPSPEED_WINDOW)


def _all_auto(node) -> bool:
    return all(_all_auto(value) for value in node.values()) if isinstance(node, dict) else node == "auto"


def drop_optimizer_sections(ds: dict, path: str | Path, notes: list[str]) -> None:
    """Remove `optimizer`/`scheduler` sections whose values are all "auto" (the run config owns them)."""
    for section, keys in (("optimizer", "optimizer.*"), ("scheduler", "scheduler.*")):
        if section not in ds:
            continue
        body = ds[section]
        kind = str(body.get("type", "")) if isinstance(body, dict) else ""
        params = body.get("params", {}) if isinstance(body, dict) else None
        if not isinstance(params, dict) or set(body) - {"type", "params"} or not _all_auto(params):
            raise ValueError(
                f"{path}: the '{section}' section sets values ({json.dumps(body)}); adept_ds builds the {section} from the "
                f"run config ('{keys}' keys) so that it can give every unit its own learning rate: remove the section, "
                'or leave its params "auto"'
            )
        if section == "optimizer" and kind.lower() not in OPTIMIZERS:
            raise ValueError(f"{path}: optimizer type {kind!r}: adept_ds trains with AdamW; name Adam or AdamW, or remove the section")
        notes.append(f"{section}: the JSON's {kind or 'untyped'} section is all \"auto\": the run config's {keys} keys are used")
        del ds[section]


def owned_values(config: RunConfig, world_size: int) -> dict[str, tuple]:
    """The JSON keys the run config owns: (its value, where it comes from), train_batch_size derived."""
    owned = {}
    for key, run_key in RUN_CONFIG_OWNS.items():
        section, _, name = run_key.partition(".")
        owned[key] = (getattr(getattr(config, section), name), run_key)
    owned["train_batch_size"] = (config.train.global_batch(world_size), "micro batch x accumulation x ranks")
    return owned


def check_owned_values(ds: dict, owned: dict[str, tuple], config: RunConfig, world_size: int, path: str | Path) -> None:
    """Refuse a JSON value that disagrees with the run config's (they may be "auto", absent or equal)."""
    for key, run_key in RUN_CONFIG_OWNS.items():
        value, wanted = ds.get(key, "auto"), owned[key][0]
        if value != "auto" and value != wanted:
            raise ValueError(
                f'{path}: {key}={value} disagrees with the run config\'s {run_key}={wanted}; the run config owns it: set it to "auto" '
                f"in the JSON (or to {wanted}), or give {run_key}={value}"
            )
    value, wanted = ds.get("train_batch_size", "auto"), owned["train_batch_size"][0]
    if value != "auto" and value != wanted:
        train = config.train
        raise ValueError(
            f"{path}: train_batch_size={value} disagrees with the run config's global batch {wanted} = train.micro_batch_size "
            f'{train.micro_batch_size} x train.gradient_accumulation_steps {train.gradient_accumulation_steps} x {world_size} ranks; set it to "auto"'
        )


def resolve_ds_config(
    path: str | Path,
    config: RunConfig,
    world_size: int,
    gpu: bool,
    model_config: dict,
    wide_window: bool = False,
    notes: list[str] | None = None,
) -> dict:
    """The DeepSpeed config with every "auto" filled from the run config, the world size, the device and the model,
    and train.zeropp's ZeRO++ keys set (quantized options refused where they cannot work: zeropp.py). `notes`, if
    given, receives one line per rule that filled a value.

    ZeRO-3's parameter window: `wide_window` (when the memory plan says gathered weights fit: memory_layout.py)
    takes DeepSpeed's defaults, so a layer gathered for forward stays live for its backward. Otherwise it is
    sized in decoder layers (`model_config`'s shape), capped at DeepSpeed's defaults: prefetch one layer ahead,
    about three layers gathered, and a gathered layer released once used unless it is needed again within a
    layer. The fixed defaults (5e7 / 1e9 / 1e9 parameters), and HF's 0.9*h*h prefetch, gather a small model
    whole: its prefetch runs ahead without bound and every layer stays gathered from forward to backward (for
    SmolLM2-135M, ~400 MB of fp32 weights per rank the step never needs at once).
    """
    notes = [] if notes is None else notes
    try:
        ds = json.loads(Path(path).read_text())
    except ValueError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage={stage!r}: choose 0, 1, 2 or 3 (adept_ds ships zero1/2/3 configs)")
    drop_optimizer_sections(ds, path, notes)
    owned = owned_values(config, world_size)
    check_owned_values(ds, owned, config, world_size, path)
    hidden = model_config.get("hidden_size")
    auto = {(key,): value for key, value in owned.items()}
    auto |= {
        ("bf16", "enabled"): (gpu, "bf16 on a GPU, fp32 on CPU"),
        ("fp16", "enabled"): (False, "bf16 or fp32 instead"),
        ("zero_optimization", "offload_optimizer", "pin_memory"): (gpu, "pinned on a GPU"),
        ("zero_optimization", "offload_param", "pin_memory"): (gpu, "pinned on a GPU"),
    }
    if hidden:  # HF Trainer's rules
        auto[("zero_optimization", "reduce_bucket_size")] = (hidden * hidden, f"hidden_size^2 (HF's rule; h={hidden})")
        auto[("zero_optimization", "stage3_param_persistence_threshold")] = (10 * hidden, f"10 x hidden_size (HF's rule; h={hidden})")
    if stage == 3:
        from adept_ds.model.families import decoder_layer_numel

        # Never above DeepSpeed's defaults: a model whose layers are that large already gets a window of layers.
        layer = decoder_layer_numel(model_config)
        for key, default in DEEPSPEED_WINDOW.items():
            rule = (
                "DeepSpeed's default (wide window: the plan fits it)"
                if wide_window
                else f"{WINDOW_LAYERS[key]} decoder layer(s), adept_ds's window"
            )
            auto[("zero_optimization", key)] = (default if wide_window else min(WINDOW_LAYERS[key] * layer, default), rule)

    def fill(node, keys):
        for key, value in list(node.items()):
            here = (*keys, key)
            if isinstance(value, dict):
                fill(value, here)
            elif value == "auto":
                if here not in auto:
                    raise ValueError(f"{path}: '{'.'.join(here)}' is \"auto\" but adept_ds has no value for it; set it explicitly")
                node[key], rule = auto[here]
                notes.append(f"{'.'.join(here)}: auto = {node[key]} ({rule})")

    fill(ds, ())
    for key, (value, _) in owned.items():  # absent: the run config's
        ds.setdefault(key, value)
    enabled = [precision for precision in ("bf16", "fp16") if ds.get(precision, {}).get("enabled")]
    if len(enabled) == 2:
        raise ValueError(f'{path}: bf16 and fp16 are both enabled; enable one (bf16 where the GPU has it), or set both to "auto"')
    if enabled and not gpu:
        raise ValueError(f'{path}: {enabled[0]} is enabled but this run is on CPU; use zero3 ("auto": fp32 on CPU, bf16 on GPU)')
    fill_grad_accum_dtype(ds, notes)
    zero = ds.get("zero_optimization", {})
    check_quantized_options(zero, gpu, path)
    apply_zeropp(zero, config, world_size, path)
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def fill_grad_accum_dtype(ds: dict, notes: list[str]) -> None:
    """bf16 under ZeRO-2/3 accumulates gradients in fp32 unless the config says otherwise (noted).

    DeepSpeed's default is the model's dtype: bf16 sums of micro-batch gradients and bf16 gradient partitions.
    ZeRO-2 and 3 honour `data_types.grad_accum_dtype` (their gradient partitions become fp32: 4 bytes per
    trainable parameter / ranks). Not ZeRO-1, where DeepSpeed then swaps in its BF16_Optimizer, a path adept_ds
    is not tested on, nor ZeRO off, where DeepSpeed refuses bf16 with fp32 accumulation.
    """
    if not ds.get("bf16", {}).get("enabled") or ds.get("zero_optimization", {}).get("stage") not in (2, 3):
        return
    data_types = ds.setdefault("data_types", {})
    if "grad_accum_dtype" not in data_types:
        data_types["grad_accum_dtype"] = "fp32"
        notes.append('data_types.grad_accum_dtype: fp32 (bf16 without it; set it to "bf16" to keep bf16)')


def describe_owners(ds: dict) -> str:
    """Which file each shared setting came from, for `adept-ds check`."""
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    return (
        f"micro batch {ds['train_micro_batch_size_per_gpu']}, accumulation {ds['gradient_accumulation_steps']}, global batch "
        f"{ds['train_batch_size']}, clipping {ds['gradient_clipping']}: the run config (train.*); precision {precision}: "
        "the DeepSpeed config (bf16/fp16 sections)"
    )


def half_precision(ds: dict) -> bool:
    """Whether a resolved DeepSpeed config trains in bf16 or fp16 (weights of 2 bytes; the GPU's tensor-core peak)."""
    return any(ds.get(kind, {}).get("enabled") for kind in ("bf16", "fp16"))
