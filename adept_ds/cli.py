"""`adept-ds` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,7,11, got {text!r}") from None


def _parse_k(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers like 4, or auto, got {text!r}") from None


DEMO_MODEL = "demo"
"""`--model demo`: the built-in demo model (SmolLM2-135M, built offline on first use), named only when asked for."""


def _model_dir(arg: str | None) -> Path:
    """The --model directory; `demo` (when no such directory exists) is the built-in demo model, fetched on first use."""
    if not arg:
        raise ValueError(
            "--model is required: a Hugging Face checkpoint directory (for the built-in demo model, SmolLM2-135M, "
            f"give --model {DEMO_MODEL}, or the directory `adept-ds fetch-demo-model` prints)"
        )
    if arg == DEMO_MODEL and not Path(arg).is_dir():
        from adept_ds.model.demo_model import fetch_demo_model

        return fetch_demo_model()
    return Path(arg)


def without_local_rank(argv: list[str]) -> list[str]:
    """argv less the `--local_rank=N` (or `--local_rank N`) DeepSpeed's launcher adds to every rank's arguments
    unless given --no_local_rank: it puts it first, before the subcommand. The rank comes from LOCAL_RANK."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            pass
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            kept.append(arg)
    return kept


def cmd_fetch_demo_model(args: argparse.Namespace) -> None:
    from adept_ds.model.demo_model import fetch_demo_model

    print(fetch_demo_model(force=args.force))


def cmd_expand(args: argparse.Namespace) -> None:
    from adept_ds.model.checkpoint import fingerprint_checkpoint, open_checkpoint
    from adept_ds.model.expand import expand_checkpoint, uniform_layers
    from adept_ds.probe.layers import layers_from_probe, probe_result_for

    model = _model_dir(args.model)
    choice = None
    if args.probe or args.uniform:
        checkpoint = open_checkpoint(model)
        num_layers = checkpoint.config.get("num_hidden_layers")
        if args.uniform:
            layers = uniform_layers(num_layers, args.k)
        elif args.k == "auto":
            from adept_ds.model.families import get_family
            from adept_ds.probe.auto_k import choose_k, parameter_counts

            result = probe_result_for(args.probe, fingerprint_checkpoint(checkpoint), num_layers)
            layer_params, model_params = parameter_counts(checkpoint, get_family(checkpoint.config.get("model_type")))
            choice = choose_k(result["scores"], layer_params, model_params, args.budget_params, args.budget_fraction)
            layers = choice.layers
            print(choice.reason())
        else:
            layers = layers_from_probe(args.probe, args.k, fingerprint_checkpoint(checkpoint), num_layers)
    else:
        layers = args.layers
    manifest = expand_checkpoint(model, args.output, layers, overwrite=args.overwrite)
    print(
        f"expanded {model} -> {args.output}: {manifest['num_original_layers']} -> {manifest['num_layers']} layers, "
        f"copies of original layers {manifest['expanded_layers']} at indices {manifest['copied_layers']}"
    )
    if choice is not None:
        from adept_ds.probe.auto_k import plot_choice

        # Beside the probe file, where `adept-ds probe` wrote its chart: the same chart, now marking this choice.
        chart = Path(args.probe).with_suffix(".png")
        plot_choice(result, choice, chart)
        print(f"chart: {chart} (chosen layers in orange, the threshold dashed)")


def cmd_probe(args: argparse.Namespace) -> None:
    from adept_ds.probe.layers import probe_model

    result = probe_model(
        _model_dir(args.model),
        args.data,
        args.output,
        method=args.method,
        max_tokens=args.max_tokens,
        block_size=args.block_size,
        batch_size=args.batch_size,
        text_field=args.text_field,
        seed=args.seed,
        dtype=args.dtype,
        mask_chunk_layers=args.mask_chunk_layers,
        offload_activations=args.offload_activations,
        packing=packing_of(args),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        if result["method"] == "mask":
            where = " in CPU memory" if result["offload_activations"] else ""
            print(
                f"mask probe: recorded activations peak {result['recorded_activation_peak_bytes'] / 2**30:.2f} GiB "
                f"per rank{where} (chunks of {result['mask_chunk_layers']} layers)"
            )
        order = result["least_important"]
        print(
            f"probe ({result['method']}): base loss {result['base_loss']:.4f} on {result['num_tokens']} tokens; "
            f"least important layers: {order[:8]}; wrote {args.output} and {Path(args.output).with_suffix('.png')}"
        )


def packing_of(args: argparse.Namespace):
    """`--document-mask` and `--loss-on-document-start` as data.document_mask and data.loss_on_document_start."""
    from adept_ds.data.blocks import Packing

    return Packing(document_mask=args.document_mask, loss_on_document_start=args.loss_on_document_start)


def add_packing_options(parser: argparse.ArgumentParser) -> None:
    """The run config's data.document_mask and data.loss_on_document_start, for the probe and eval commands."""
    parser.add_argument(
        "--document-mask",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="position ids that restart at each document, so a token attends only to its own document (data.document_mask; "
        "default off); needs stores with document boundaries",
    )
    parser.add_argument(
        "--loss-on-document-start",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score each document's first token, predicted across the boundary (data.loss_on_document_start; default on)",
    )


def cmd_make_probe_corpus(args: argparse.Namespace) -> None:
    from adept_ds.probe.corpus import make_probe_corpus

    options = {name: getattr(args, name) for name in ("seed", "temperature", "top_p", "batch_size", "max_new_tokens", "dtype")}
    stats = make_probe_corpus(_model_dir(args.model), args.output, args.tokens, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"probe corpus: {stats['tokens']:,} tokens in {stats['documents']:,} documents (from {stats['start_token']!r}) -> "
            f"{args.output}; sampled {stats['sampled_tokens']:,} tokens in {stats['seconds']:.1f} s "
            f"({stats['tokens_per_second']:,.1f} tokens/s on {stats['world_size']} rank(s), {stats['dtype']})"
        )


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from adept_ds.data.token_store import is_store, open_store, prepare_store

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: need at least 1 worker process")
    if args.max_tokens is not None and args.max_tokens < args.block_size:
        raise ValueError(f"--max-tokens {args.max_tokens} is smaller than one block of {args.block_size} tokens")
    tokenizer = AutoTokenizer.from_pretrained(_model_dir(args.model))
    if is_store(args.output):
        store = open_store(args.output)
        store.check_compatible(tokenizer, args.block_size)
        old = (
            ""
            if store.doc_starts is not None
            else "; it records no document boundaries (format 1): delete it and run this again to record them"
        )
        print(f"{args.output} is already a token store ({len(store)} blocks of {store.block_size} tokens); nothing to do{old}")
        return
    store = prepare_store(args.data, args.output, tokenizer, args.block_size, args.text_field, args.workers, args.max_tokens)
    manifest = store.manifest
    print(
        f"prepared {args.output}: {manifest['num_tokens']:,} tokens in {manifest['num_blocks']:,} blocks of {manifest['block_size']} "
        f"({manifest['dtype']}) from {manifest['num_documents']:,} documents in {manifest['seconds']} s "
        f"({manifest['tokens_read'] / max(manifest['seconds'], 1e-9):,.0f} tokens/s, {manifest['workers']} workers)"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from adept_ds.training.export import export_checkpoint

    checkpoints = Path(args.run) / "checkpoints"
    model = args.model
    if model is None:
        import yaml

        config_file = Path(args.run) / "run_config.yaml"
        if not config_file.is_file():
            raise ValueError(f"{args.run} has no run_config.yaml; pass --model (the model training started from)")
        from adept_ds.run.config import with_model_section

        model = with_model_section(yaml.safe_load(config_file.read_text()))["model"]["path"]  # also `model: DIR`, older runs
    output = export_checkpoint(checkpoints, args.tag, model, args.output, overwrite=args.overwrite)
    print(f"exported {checkpoints}/{args.tag or '(newest complete checkpoint)'} -> {output}")


def held_out_corpora(args: argparse.Namespace) -> dict[str, str]:
    """--general and --domain, those given, by name."""
    return {name: path for name, path in (("general", args.general), ("domain", args.domain)) if path}


def cmd_merge(args: argparse.Namespace) -> None:
    if args.alpha is not None:
        from adept_ds.model.merge import merge_checkpoints

        output = merge_checkpoints(args.base, args.trained, args.alpha, args.output, overwrite=args.overwrite)
        print(f"merged {args.trained} toward {args.base} at alpha={args.alpha:g} -> {output}")
        return
    from adept_ds.evaluation.merge_curve import merge_curve

    try:
        alphas = [float(alpha) for alpha in args.alphas.split(",") if alpha.strip()]
    except ValueError:
        raise ValueError(f"--alphas {args.alphas!r}: need comma-separated weights in [0, 1], e.g. 0.25,0.5,0.75") from None
    corpora = held_out_corpora(args)
    points = merge_curve(args.base, args.trained, alphas, args.output, corpora, args.qa, args.max_blocks, args.max_questions)
    print("alpha | general ppl (increase) | domain ppl (drop)" + (" | accuracy" if args.qa else ""))
    for entry in points:
        accuracy = f" | {entry['accuracy']:.1%}" if "accuracy" in entry else ""
        print(
            f"{entry['alpha']:g} | {entry['general_perplexity']:.2f} ({entry['general_increase']:+.2f}) | "
            f"{entry['domain_perplexity']:.2f} ({entry['domain_drop']:+.2f}){accuracy}"
        )
    print(f"curve: {Path(args.output) / 'merge_curve.png'}, {Path(args.output) / 'merge_curve.json'}")


def planned_world(args: argparse.Namespace) -> tuple[int, int, str]:
    """(world size, ranks per node, why) of the job `check` describes: a hostfile's slots (capped by --num-gpus),
    else --num-nodes x --num-gpus, else one rank per node."""
    from adept_ds.run.hostfile import read_hostfile

    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
        per_host = [min(slots, args.num_gpus or slots) for slots in hosts.values()]
        return sum(per_host), per_host[0], f"{len(hosts)} hosts in {args.hostfile}: " + " + ".join(map(str, per_host)) + " ranks"
    if args.num_gpus:
        return args.num_gpus * args.num_nodes, args.num_gpus, f"--num-nodes {args.num_nodes} x --num-gpus {args.num_gpus}"
    return args.num_nodes, 1, "no --hostfile or --num-gpus, so 1 rank per node was assumed; give them for the job's world size"


def planned_device(args: argparse.Namespace) -> tuple[bool, str]:
    """(GPU?, why): --device, else DS_ACCELERATOR=cpu, else GPUs when a hostfile or --num-gpus describes the job
    (a login node without GPUs checks a GPU job), else this machine's."""
    import torch

    if args.device:
        return args.device == "gpu", f"--device {args.device}"
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return False, "DS_ACCELERATOR=cpu; --device gpu to check a GPU job"
    if args.hostfile or args.num_gpus:
        return True, "--hostfile/--num-gpus describe a GPU job; --device cpu for CPU ranks"
    gpu = torch.cuda.is_available()
    return gpu, f"this machine has {'a' if gpu else 'no'} GPU; --device gpu|cpu to check for a job elsewhere"


def mixture_shares(sources) -> str:
    """A mixture's sources with their shares of the samples ("math 0.8, general 0.2"); "" for one corpus."""
    total = sum(source.weight for source in sources)
    return ", ".join(f"{source.name} {source.weight / total:.3g}" for source in sources) if len(sources) > 1 else ""


def _run_config(args: argparse.Namespace, with_overrides: bool = False):
    """(the run config file, the run config) of `--config` or a leading RUN.yaml, plus the key=value overrides;
    with `with_overrides`, the overrides (without the RUN.yaml) too."""
    from adept_ds.run.config import load_run_config

    overrides = list(args.overrides)
    config_file = args.config
    if config_file is None and overrides and "=" not in overrides[0]:
        config_file = overrides.pop(0)
    config = load_run_config(config_file, overrides)
    return (config_file, config, overrides) if with_overrides else (config_file, config)


def print_paths(config, config_file: str | None) -> None:
    """Each path of the run config as the run will use it."""
    from adept_ds.run.config import PATH_KEYS, _get

    base = f"{Path(config_file).absolute().parent} (the run config's directory)" if config_file else "the current directory"
    print(f"paths (in the file: relative to {base}; in key=value overrides: to the current directory):")
    values = config.to_dict()
    for key in PATH_KEYS:
        value = _get(values, key)
        if isinstance(value, list):
            value = ", ".join(f"{source.name}: {source.path}" for source in config.data.domain_sources())
        if value:
            print(f"  {key}: {value}")


def cmd_check(args: argparse.Namespace) -> None:
    from adept_ds.run.ds_config import describe_owners
    from adept_ds.run.zeropp import describe as describe_zeropp
    from adept_ds.training.resolve import resolve_run
    from adept_ds.training.validation import validation_blocks

    config_file, config = _run_config(args)
    world_size, per_node, where = planned_world(args)
    gpu, device_reason = planned_device(args)
    config = with_node_size(config, per_node)
    try:
        # As the trainer resolves it: the same stores prepared, the same held-out split and run length.
        run = resolve_run(config, world_size, gpu, data=not args.skip_data)
    except ValueError as err:
        raise ValueError(f"{err} [checked for {'GPU' if gpu else 'CPU'} ranks: {device_reason}]") from None
    ds = run.ds_config
    print(f"config: {config_file or '(overrides only)'}: method {config.method}, model {config.model.path} ({run.family.name})")
    print_paths(config, config_file)
    print(f"device: {'GPU' if gpu else 'CPU'} ({device_reason})")
    print(
        f"world: {world_size} ranks ({where}); global batch {ds['train_batch_size']} = micro {ds['train_micro_batch_size_per_gpu']} "
        f"x accumulation {ds['gradient_accumulation_steps']} x {world_size} ranks; ZeRO stage "
        f"{ds.get('zero_optimization', {}).get('stage', 0)}, {'bf16' if ds.get('bf16', {}).get('enabled') else 'fp32'}"
    )
    print(f"owners: {describe_owners(ds)}")
    print(f"units: {len(run.unit_names)} trainable ({', '.join(run.unit_names[:3])}{', ...' if len(run.unit_names) > 3 else ''})")
    for note in run.ds_notes:
        print(f"deepspeed config: {note}")
    print(f"memory: {run.layout.note}" + ("; `adept-ds plan` shows each term" if "does not fit" in run.layout.note else ""))
    print(f"zero++: {describe_zeropp(ds, config, world_size, run.layout.frozen_weights)}")
    print(f"attention: {run.attention_note}")
    for line in run.self_replay:  # verified with --skip-data too: it reads manifests, not tokens
        print(f"self-replay: {line}")
    if run.data is not None:
        for name, store in run.data.stores(config).items():
            print(
                f"data: {name} {config.corpora()[name].path}: {len(store)} blocks of {config.data.block_size} tokens (token store {store.path})"
            )
        if config.eval.interval:
            count, settings = validation_blocks(config, world_size), config.data
            general = settings.general_eval or (
                f"the last blocks of {settings.general}" if settings.general else "none (no general corpus)"
            )
            domain = settings.domain_eval or f"the last blocks of {config.data.domain_sources()[0].path}, not trained on"
            print(f"validation: every {config.eval.interval} steps, {count} blocks per corpus; general: {general}; domain: {domain}")
        for note in run.notes:
            print(f"length: {note}")
    elif config.train.epochs or config.scheduler.warmup_ratio:
        print("length: train.epochs / scheduler.warmup_ratio are resolved from the corpus's size when the run starts (--skip-data)")
    print("ok: nothing wrong found")


def with_node_size(config, ranks_per_node: int):
    """train.hpz_ranks=0 means the launcher's ranks per node, which a login node cannot read: take the planned count."""
    import dataclasses

    if "hpz" in config.train.zeropp and not config.train.hpz_ranks:
        return dataclasses.replace(config, train=dataclasses.replace(config.train, hpz_ranks=ranks_per_node))
    return config


PLAN_DOES_NOT_FIT = 3
"""`adept-ds plan`'s exit code when a phase does not fit (2: bad input), so that a submit script can stop on it."""


def cmd_plan(args: argparse.Namespace) -> int:
    from adept_ds.run.plan import GIB
    from adept_ds.run.plan_report import render
    from adept_ds.training.resolve import resolve_plan

    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: need at least 1")
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb {args.gpu_memory_gb}: need a positive number of GiB")
    if args.write_gb_per_s <= 0:
        raise ValueError(f"--write-gb-per-s {args.write_gb_per_s}: need a positive bandwidth")
    check_time_options(args)
    _, config = _run_config(args)
    if not config.model.path:
        raise ValueError("model is not set: give model=DIR (a model directory or its config.json; no weights are read)")
    memory = None if args.gpu_memory_gb is None else int(args.gpu_memory_gb * GIB)
    config = with_node_size(config, args.gpus_per_node)
    run = resolve_plan(config, args.nodes * args.gpus_per_node, args.device == "gpu", memory, args.k)
    layout, plan = run.layout, run.plan
    code = 0 if all(plan.fits(phase) for phase in plan.phases) else PLAN_DOES_NOT_FIT
    timing = planned_time(args, run) if args.tokens else None
    if args.json:
        print(
            json.dumps(
                {name: {"total": phase.total, "where": phase.where, **phase.terms} for name, phase in plan.phases.items()}
                | {"checkpoint_bytes": plan.checkpoint_bytes, "checkpoint_bytes_per_rank": plan.checkpoint_bytes_per_rank}
                | {"frozen_weights": layout.frozen_weights, "wide_window": layout.wide_window}
                | {"fits": {name: plan.fits(name) for name in plan.phases}}
                | ({"time": timing} if timing else {})
            )
        )
        return code
    print(render(config, run.shape, plan, args.nodes, args.gpus_per_node, args.write_gb_per_s))
    if timing:
        print(describe_time(timing))
    return code


def check_time_options(args: argparse.Namespace) -> None:
    """`plan`'s time options, each refused on its own line with what would be valid."""
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens {args.tokens}: need the training tokens to plan for, at least 1 (e.g. 50000000000)")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: need a fraction of the peak in (0, 1] (0.35: torchtitan's H100 figure)")
    if args.network_gbps is not None and args.network_gbps <= 0:
        raise ValueError(f"--network-gbps {args.network_gbps}: need a positive bandwidth in Gb/s per GPU (e.g. 400 for NDR InfiniBand)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops {args.peak_tflops}: need a positive dense peak in TFLOP/s per device")
    if args.tokens is None and any(value is not None for value in (args.mfu, args.network_gbps, args.peak_tflops)):
        raise ValueError("--mfu, --network-gbps and --peak-tflops time a run: give --tokens too")
    if args.tokens is not None and args.device == "cpu" and args.network_gbps is None:
        raise ValueError("--device cpu --tokens: give --network-gbps, gloo's all-gather rate here (benchmarks/train_step.py measures it)")


def planned_time(args: argparse.Namespace, run) -> dict:
    """Step time, steps, hours and GPU-hours for --tokens, with where each assumption comes from."""
    import math

    import torch

    from adept_ds.run.ds_config import half_precision
    from adept_ds.run.flops import gpu_peak_tflops
    from adept_ds.run.step_time import DEFAULT_NETWORK_GBPS, H100_MFU, link_rates, run_step_time
    from adept_ds.runtime.distributed import usable_cpus
    from adept_ds.training.throughput import measure_matmul_tflops

    gpu, ds = args.device == "gpu", run.ds_config
    half = half_precision(ds)
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    elif run.config.train.peak_tflops:
        peak, peak_source = run.config.train.peak_tflops, "train.peak_tflops"
    elif gpu:
        peak, peak_source = gpu_peak_tflops("H100", half), f"H100 SXM datasheet, {'bf16' if half else 'fp32'} dense"
    else:  # with this machine's cores shared among a node's ranks, as training shares them
        torch.set_num_threads(max(1, usable_cpus() // args.gpus_per_node))
        peak, peak_source = measure_matmul_tflops(), f"a 1024^2 fp32 matmul measured here on {torch.get_num_threads()} thread(s)"
    mfu = args.mfu or H100_MFU
    network = args.network_gbps or DEFAULT_NETWORK_GBPS
    world = args.nodes * args.gpus_per_node
    timing = run_step_time(run.config, run.shape, run.flops, ds, run.layout, world, args.nodes, gpu, peak, mfu, network, run.held_out)
    network_source = "--network-gbps" if args.network_gbps else "one 400 Gb/s NDR NIC per GPU (run/step_time.py)"
    between, _ = link_rates(network, gpu, args.nodes)
    if between != network:  # one GPU node: its collectives run on NVLink
        network, network_source = between, "one node: NVLink (run/step_time.py)"
    tokens_per_step = run.config.train.global_batch(world) * run.config.data.block_size
    steps = math.ceil(args.tokens / tokens_per_step)
    hours = steps * timing.seconds / 3600
    return {
        "tokens": args.tokens,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "step_s": timing.seconds,
        "compute_s": timing.compute_s,
        "communication_s": timing.communication_s,
        "step_tflop": run.flops.total / 1e12,
        "step_tflop_6n": run.flops.six_n / 1e12,
        "network_bytes_per_rank": timing.traffic.network,
        "node_local_bytes_per_rank": timing.traffic.node_local,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": mfu,
        "mfu_source": "--mfu" if args.mfu else "torchtitan's H100 BF16 figure (run/step_time.py)",
        "network_gbps": network,
        "network_source": network_source,
        "hours": hours,
        "gpu_hours": hours * world,
    }


def describe_time(timing: dict) -> str:
    """`plan --tokens`'s lines."""
    return "\n".join(
        [
            f"time: {timing['step_s']:.3g} s a step = compute {timing['compute_s']:.3g} s ({timing['step_tflop']:.4g} TFLOP at "
            f"MFU {timing['mfu']:.0%} of {timing['peak_tflops']:.4g} TFLOP/s per device: {timing['peak_source']}; "
            f"{timing['step_tflop_6n']:.4g} TFLOP at 6N) + communication {timing['communication_s']:.3g} s "
            f"({timing['network_bytes_per_rank'] / 1e9:.3g} GB per rank at {timing['network_gbps']:g} Gb/s, "
            f"{timing['node_local_bytes_per_rank'] / 1e9:.3g} GB node-local); no overlap assumed",
            f"time: {timing['tokens']:,} tokens = {timing['steps']:,} steps of {timing['tokens_per_step']:,}: "
            f"{timing['hours']:,.1f} h, {timing['gpu_hours']:,.0f} GPU-hours (MFU: {timing['mfu_source']}; "
            f"network: {timing['network_source']})",
        ]
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from adept_ds.evaluation.evaluate import evaluate_model, run_lm_eval
    from adept_ds.runtime.distributed import shutdown_distributed

    corpora = held_out_corpora(args)
    if not corpora and not args.qa and not args.lm_eval_tasks:
        raise ValueError("nothing to evaluate: give --general, --domain, --qa and/or --lm-eval-tasks")
    for path in [*corpora.values(), *([args.qa] if args.qa else [])]:
        if not Path(path).exists():
            raise ValueError(f"evaluation data {path} does not exist")
    model = _model_dir(args.model)
    results = evaluate_model(
        model,
        corpora,
        args.qa,
        args.block_size,
        args.max_blocks,
        args.max_questions,
        args.answer_pattern,
        dtype=args.dtype,
        packing=packing_of(args),
    )
    if args.lm_eval_tasks:
        results["lm_eval"] = run_lm_eval(model, args.lm_eval_tasks.split(","), args.max_questions)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(results, indent=2)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text + "\n")
        print(text)
    shutdown_distributed()  # a no-op unless launched on several ranks


def launcher_command(args: argparse.Namespace) -> list[str]:
    """DeepSpeed's launcher (the `deepspeed` of this environment) with the job's rank layout."""
    import shutil

    from adept_ds.runtime.distributed import free_port

    runner = Path(sys.executable).parent / "deepspeed"
    command = [str(runner) if runner.is_file() else shutil.which("deepspeed") or "deepspeed"]
    if args.hostfile:
        from adept_ds.run.hostfile import read_hostfile

        read_hostfile(args.hostfile)  # DeepSpeed would fall back to this machine alone on a missing one
        command += ["--hostfile", args.hostfile]
    if args.num_gpus:
        command += ["--num_gpus", str(args.num_gpus)]
    if args.no_ssh:
        command += ["--no_ssh", "--num_nodes", str(args.num_nodes), "--node_rank", str(args.node_rank)]
    if args.master_addr:
        command += ["--master_addr", args.master_addr]
    # One machine: a free port, so that two jobs (or a job beside a demo) never meet at DeepSpeed's fixed 29500.
    port = args.master_port or (None if args.hostfile else free_port())
    return command + (["--master_port", str(port)] if port else [])


def cmd_train(args: argparse.Namespace) -> int:
    """`deepspeed [layout] --module adept_ds.train --config RUN.yaml ...`, after checking the config here."""
    import shlex
    import subprocess

    from adept_ds.training.resolve import check_self_replay

    config_file, config, overrides = _run_config(args, with_overrides=True)
    if config_file is None:
        raise ValueError("give the run config: adept-ds train RUN.yaml [--num-gpus N | --hostfile H] [key=value ...]")
    config.validate_paths()  # a bad key, value or path fails here, before any rank starts
    check_self_replay(config)  # and self-replay text from another model than the run's base (a JSON read each)
    resume = ["--resume"] if args.resume else ["--auto-resume"] if args.auto_resume else []
    command = [*launcher_command(args), "--module", "adept_ds.train", "--config", str(Path(config_file).absolute()), *overrides, *resume]
    print("+ " + shlex.join(command), flush=True)
    return subprocess.call(command, env=launcher_env(args))


def launcher_env(args: argparse.Namespace) -> dict[str, str]:
    """The launcher's environment: CPU ranks on one machine without a GPU get DeepSpeed's CPU accelerator (gloo)."""
    import torch

    env = dict(os.environ)
    if not args.hostfile and not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def cmd_sweep(args: argparse.Namespace) -> int:
    """Recipes x learning rates x seeds on the run config, each trained under DeepSpeed's launcher (evaluation/sweep.py)."""
    from adept_ds.evaluation.sweep import DEFAULT_VARIANTS, Sweep, main_sweep, parse_lrs, parse_variant

    config_file, config, overrides = _run_config(args, with_overrides=True)
    if config_file is None:
        raise ValueError("give the run config: adept-ds sweep RUN.yaml [--num-gpus N] --variants ... --lrs ... [key=value ...]")
    variants = [parse_variant(text) for text in (args.variants or DEFAULT_VARIANTS).split(",") if text.strip()]
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variants {args.variants!r} names a recipe twice")
    for flag, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--calibration-steps", args.calibration_steps)):
        if value is not None and value < (2 if flag == "--calibration-steps" else 1):
            raise ValueError(f"{flag} {value}: need at least {2 if flag == '--calibration-steps' else 1}")
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()] if args.alphas else []
    except ValueError:
        alphas = [-1.0]
    if any(not 0 < alpha < 1 for alpha in alphas):
        raise ValueError(f"--alphas {args.alphas!r}: each alpha strictly between 0 and 1 (the ends are the base and the trained model)")
    if args.budget_hours is not None and not args.budget_hours > 0:
        raise ValueError(f"--budget-hours {args.budget_hours:g}: need a positive number of hours")
    replaying = [v.name for v in variants if v.replay and not v.self_replay]
    if replaying and not config.data.general:
        raise ValueError(f"{', '.join(replaying)} replay general text: set data.general in the run config (or use +self_replayPCT)")
    corpora = {"general": args.general or config.data.general_eval, "domain": args.domain or config.data.domain_eval}
    missing = [name for name, path in corpora.items() if not path]
    if missing:
        raise ValueError(
            f"the sweep scores held-out {' and '.join(missing)} text: give --{' and --'.join(missing)} or data.{missing[0]}_eval in the run config"
        )
    for path in [*corpora.values(), *([args.qa] if args.qa else [])]:
        if not Path(path).exists():
            raise ValueError(f"evaluation data {path} does not exist")
    sweep = Sweep(
        config_file=Path(config_file).absolute(),
        overrides=overrides,
        variants=variants,
        lrs=parse_lrs(args.lrs) if args.lrs else [config.optimizer.lr],
        seeds=args.seeds,
        steps=args.steps or config.train.max_steps,
        output=Path(args.output).absolute(),
        launcher=lambda: launcher_command(args),
        world_size=planned_world(args)[0],
        corpora={name: str(Path(path).absolute()) for name, path in corpora.items()},
        qa=str(Path(args.qa).absolute()) if args.qa else None,
        alphas=alphas,
        max_blocks=args.max_blocks,
        max_questions=args.max_questions,
        budget_hours=args.budget_hours,
        calibration_steps=args.calibration_steps,
        keep_checkpoints=args.keep_checkpoints,
        base=Path(args.base).absolute() if args.base else None,
        env=launcher_env(args),
        domain_mixture=mixture_shares(config.data.domain_sources()),
    )
    return main_sweep(sweep)


def cmd_init(args: argparse.Namespace) -> None:
    from adept_ds.run.config import starter_config

    output = Path(args.output)
    if output.exists() and not args.force:
        raise ValueError(f"{output} exists; pass --force to replace it")
    text = starter_config(args.overrides, output.absolute().parent)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}: edit it (or give key=value here), then: adept-ds check --config {output}; adept-ds train {output} --num-gpus N")


def cmd_demo(args: argparse.Namespace) -> None:
    from adept_ds.pipeline import run_demo

    for flag, value, least in (
        ("--probe-tokens", args.probe_tokens, 512),
        ("--max-questions", args.max_questions, 1),
        ("--eval-tokens", args.eval_tokens, 128),
    ):
        if value < least:
            raise ValueError(f"demo {flag} {value}: need at least {least}")
    report = run_demo(
        args.output,
        compare=args.compare,
        steps=args.steps,
        num_procs=args.num_procs,
        probe_tokens=args.probe_tokens,
        max_questions=args.max_questions,
        eval_tokens=args.eval_tokens,
    )
    print(report.read_text())


MODEL_HELP = f"Hugging Face checkpoint directory ('{DEMO_MODEL}': the built-in demo model)"


def add_launcher_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML (or give it as the first positional argument)")
    parser.add_argument("--num-gpus", type=int, help="ranks per node (deepspeed --num_gpus; caps hostfile slots)")
    parser.add_argument("--hostfile", help="DeepSpeed/MPI hostfile ('HOST slots=N' lines), for several nodes")
    parser.add_argument("--master-addr", help="rendezvous address (several nodes: the first node)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: a free one on one node, 29500 with a hostfile)")
    parser.add_argument("--no-ssh", action="store_true", help="several nodes without ssh: start on every node with --node-rank")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (with --no-ssh; default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank (with --no-ssh; 0 = the master)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adept-ds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch-demo-model", help="build the offline demo model (SmolLM2-135M) in the cache")
    fetch.add_argument("--force", action="store_true", help="rebuild even if cached")
    fetch.set_defaults(func=cmd_fetch_demo_model)

    expand = commands.add_parser("expand", help="insert function-preserving copies after selected layers")
    expand.add_argument("--model", help=MODEL_HELP)
    expand.add_argument("--output", required=True, help="directory for the expanded checkpoint")
    choice = expand.add_mutually_exclusive_group(required=True)
    choice.add_argument("--layers", type=_parse_layers, help="original 0-based layer indices, e.g. 3,7,11")
    choice.add_argument("--probe", help="probe result file from `adept-ds probe`; use with --k")
    choice.add_argument("--uniform", action="store_true", help="LLaMA-Pro placement: a copy after every L/k-th layer; use with --k")
    expand.add_argument(
        "--k",
        type=_parse_k,
        help="how many of the probe's least important layers to expand, or auto (with --probe): every layer scoring at "
        "most 0.5 x the median score (at least 1), capped by --budget-params / --budget-fraction",
    )
    budget = expand.add_mutually_exclusive_group()
    budget.add_argument("--budget-params", type=int, help="with --k auto: the most parameters the copies may add (k x one layer's)")
    budget.add_argument(
        "--budget-fraction", type=float, help="with --k auto: the most parameters the copies may add, as a fraction of the model's"
    )
    expand.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    expand.set_defaults(func=cmd_expand)

    probe = commands.add_parser("probe", help="score each decoder layer's importance for general competence")
    probe.add_argument("--model", help=MODEL_HELP)
    probe.add_argument("--data", required=True, help="general probe corpus: JSONL/text/Parquet file or directory, or a datasets dir")
    probe.add_argument("--output", required=True, help="result JSON path (a PNG chart is written beside it)")
    probe.add_argument("--method", default="mask", help="mask (default: loss increase when bypassed), grad or fisher")
    probe.add_argument("--max-tokens", type=int, default=65536, help="token budget (default 65536)")
    probe.add_argument("--block-size", type=int, default=256, help="tokens per block (default 256)")
    probe.add_argument("--batch-size", type=int, default=4, help="blocks per forward pass and rank (default 4)")
    probe.add_argument("--text-field", default="text", help="name of the text field in JSONL/Parquet (default text)")
    probe.add_argument("--seed", type=int, help="draw the blocks from the whole corpus by this seed (default: its first blocks)")
    probe.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto (default): the model's dtype on GPU, float32 on CPU"
    )
    probe.add_argument(
        "--mask-chunk-layers",
        type=int,
        help="mask: bypass candidates per chunk, whose layer inputs are held at once (default: as many as fit 2 GiB per rank)",
    )
    probe.add_argument("--offload-activations", action="store_true", help="mask: hold the recorded layer inputs in CPU memory")
    add_packing_options(probe)
    probe.set_defaults(func=cmd_probe)

    corpus = commands.add_parser(
        "make-probe-corpus", help="sample a general probe corpus from the model itself (for users with only domain data)"
    )
    corpus.add_argument("--model", help=MODEL_HELP)
    corpus.add_argument("--tokens", type=int, required=True, help="stop once the documents hold this many generated tokens")
    corpus.add_argument(
        "--output", required=True, help="JSONL file ({'text': ...} per line) + FILE.manifest.json, for probe --data or self-replay"
    )
    corpus.add_argument("--seed", type=int, default=0, help="sampling seed (default 0); batch b is seeded from (seed, b)")
    corpus.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    corpus.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95; no top-k)")
    corpus.add_argument("--batch-size", type=int, default=16, help="documents per generate call and rank (default 16)")
    corpus.add_argument("--max-new-tokens", type=int, default=256, help="tokens per document at most (default 256)")
    corpus.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto (default): the model's dtype on GPU, float32 on CPU"
    )
    corpus.set_defaults(func=cmd_make_probe_corpus)

    prepare = commands.add_parser("prepare-data", help="tokenise and pack a corpus once into a memory-mapped token store")
    prepare.add_argument("--model", help="model (its tokenizer) the store is for: " + MODEL_HELP)
    prepare.add_argument("--data", required=True, help="corpus: JSONL/JSON/text/Parquet file or directory, or a datasets dir")
    prepare.add_argument("--output", required=True, help="directory for the store (tokens.bin + manifest.json)")
    prepare.add_argument("--block-size", type=int, default=256, help="tokens per block (default 256; the run's data.block_size)")
    prepare.add_argument("--text-field", default="text", help="name of the text field in JSONL/Parquet (default text)")
    prepare.add_argument("--workers", type=int, help="tokenising processes (default: every core)")
    prepare.add_argument("--max-tokens", type=int, help="stop after this many tokens (default: the whole corpus)")
    prepare.set_defaults(func=cmd_prepare_data)

    export = commands.add_parser("export", help="write a training checkpoint as a plain HF safetensors checkpoint")
    export.add_argument("--run", required=True, help="training output_dir (holds checkpoints/ and run_config.yaml)")
    export.add_argument("--tag", help="checkpoint, e.g. step500 (or step00000500; default: the newest complete one)")
    export.add_argument("--model", help="model training started from (default: from run_config.yaml)")
    export.add_argument("--output", required=True, help="directory for the HF checkpoint")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    export.set_defaults(func=cmd_export)

    merge = commands.add_parser(
        "merge", help="interpolate a trained HF checkpoint toward its base (alpha 0: the base, 1: the trained model), streamed"
    )
    merge.add_argument("--base", required=True, help="the model training started from (for an expanded model: the one expand read)")
    merge.add_argument("--trained", required=True, help="the trained HF checkpoint (adept-ds export's output)")
    weights = merge.add_mutually_exclusive_group(required=True)
    weights.add_argument("--alpha", type=float, help="one merge: 0 gives the base model's function, 1 the trained model's")
    weights.add_argument(
        "--alphas", help="the curve: e.g. 0.25,0.5,0.75, each merged and evaluated with the ends (needs --general, --domain)"
    )
    merge.add_argument("--output", required=True, help="the merged HF checkpoint (--alpha), or the curve's directory (--alphas)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (--alpha)")
    merge.add_argument("--general", help="held-out general corpus (--alphas)")
    merge.add_argument("--domain", help="held-out domain corpus (--alphas)")
    merge.add_argument("--qa", help="domain QA JSONL for accuracy at each point (--alphas)")
    merge.add_argument("--max-blocks", type=int, default=64, help="blocks per perplexity corpus (default 64)")
    merge.add_argument("--max-questions", type=int, help="cap on QA records")
    merge.set_defaults(func=cmd_merge)

    train = commands.add_parser(
        "train", help="Stage 2: train a run config under DeepSpeed's launcher (deepspeed --module adept_ds.train ...)"
    )
    add_launcher_options(train)
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    resume.add_argument("--auto-resume", action="store_true", help="continue if there is a complete checkpoint, else start")
    train.add_argument("overrides", nargs="*", metavar="[RUN.yaml] key=value", help="the run config, then key.sub=value overrides")
    train.set_defaults(func=cmd_train)

    sweep = commands.add_parser(
        "sweep",
        help="which recipe forgets least: variants x learning rates x seeds trained under DeepSpeed's launcher, evaluated, merged, reported",
    )
    add_launcher_options(sweep)
    sweep.add_argument(
        "--variants",
        help="comma-separated METHOD[+replayPCT|+self_replayPCT][@LR], e.g. adept,adept+replay25,pt_full+replay25,llama_pro@3e-4 "
        "(default adept,adept+replay25,pt_full,pt_full+replay25)",
    )
    sweep.add_argument(
        "--lrs", help="learning rates every variant without @LR trains at, e.g. 1e-4,3e-4,1e-3 (default: the config's optimizer.lr)"
    )
    sweep.add_argument("--seeds", type=int, default=3, help="seeds per variant and LR: train.seed 0..N-1 (default 3)")
    sweep.add_argument("--steps", type=int, help="training steps per run (default: the config's train.max_steps)")
    sweep.add_argument("--output", default="sweep", help="the sweep's directory: runs, results.jsonl, report.md (default ./sweep)")
    sweep.add_argument("--general", help="held-out general corpus (default: the config's data.general_eval)")
    sweep.add_argument("--domain", help="held-out domain corpus (default: the config's data.domain_eval)")
    sweep.add_argument("--qa", help="domain QA JSONL: exact-match accuracy of every model")
    sweep.add_argument(
        "--alphas",
        default="0.25,0.5,0.75",
        help="merge points toward the base, evaluated for every run (default 0.25,0.5,0.75; '' for none)",
    )
    sweep.add_argument("--max-blocks", type=int, default=64, help="blocks per perplexity corpus (default 64)")
    sweep.add_argument("--max-questions", type=int, help="cap on QA records")
    sweep.add_argument("--budget-hours", type=float, help="refuse to start when the measured estimate of what is left exceeds this")
    sweep.add_argument("--calibration-steps", type=int, default=3, help="steps of each method timed before the sweep (default 3)")
    sweep.add_argument("--keep-checkpoints", action="store_true", help="keep each run's DeepSpeed checkpoints (default: only final/)")
    sweep.add_argument("--base", help="the base model, when it moved since `adept-ds expand` read it (checked by fingerprint)")
    sweep.add_argument(
        "overrides", nargs="*", metavar="[RUN.yaml] key=value", help="the run config, then key.sub=value overrides for every run"
    )
    sweep.set_defaults(func=cmd_sweep)

    init = commands.add_parser("init", help="write a starter run config: every key, its default and what it does")
    init.add_argument("output", help="the run config YAML to write, e.g. run.yaml")
    init.add_argument("overrides", nargs="*", help="key.sub=value to fill in, e.g. model=DIR data.domain=PATH method=pt_full")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(func=cmd_init)

    check = commands.add_parser("check", help="validate a run's inputs (config, paths, model, DeepSpeed batch arithmetic, hostfile, data)")
    check.add_argument("--config", help="run config YAML (or give it as the first positional argument)")
    check.add_argument("--hostfile", help="DeepSpeed/MPI hostfile ('HOST slots=N' lines): its slots give the world size")
    check.add_argument("--num-gpus", type=int, help="ranks per node (as deepspeed --num_gpus; caps hostfile slots)")
    check.add_argument("--num-nodes", type=int, default=1, help="nodes, without a hostfile (default 1)")
    check.add_argument(
        "--device",
        choices=("gpu", "cpu"),
        help="where the job will train (default: GPUs with --hostfile/--num-gpus, unless DS_ACCELERATOR=cpu; else this machine's)",
    )
    check.add_argument("--skip-data", action="store_true", help="do not tokenise the corpora (they are cached for the run otherwise)")
    check.add_argument("overrides", nargs="*", metavar="[RUN.yaml] key=value", help="key.sub=value overrides, as given to train")
    check.set_defaults(func=cmd_check)

    plan = commands.add_parser(
        "plan", help="per-rank memory of training, importance, probe and export, and checkpoint size, before queueing"
    )
    plan.add_argument("--config", help="run config YAML (model= may be a directory holding only config.json)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8)")
    plan.add_argument("--gpu-memory-gb", type=float, default=80, help="memory per GPU in GiB (default 80)")
    plan.add_argument("--k", type=int, help="copies to plan for when the model is not expanded yet (default: the config's k)")
    plan.add_argument("--write-gb-per-s", type=float, default=1.0, help="checkpoint write bandwidth, GB/s in all (default 1)")
    plan.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="plan for GPUs (default) or CPU ranks (fp32, RSS)")
    plan.add_argument("--json", action="store_true", help="print the terms as JSON (bytes)")
    plan.add_argument("--tokens", type=int, help="training tokens: add step time, time-to-train and GPU-hours")
    plan.add_argument("--mfu", type=float, help="fraction of the peak the compute reaches (default 0.35: torchtitan's H100 figure)")
    plan.add_argument("--network-gbps", type=float, help="Gb/s per GPU between nodes (default 400: one NDR InfiniBand NIC per GPU)")
    plan.add_argument(
        "--peak-tflops", type=float, help="dense peak per device (default: H100 SXM's datasheet on GPU; a matmul measured here on CPU)"
    )
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides, as given to launch/train.py")
    plan.set_defaults(func=cmd_plan)

    evaluate = commands.add_parser("eval", help="perplexity on held-out corpora and QA exact-match accuracy")
    evaluate.add_argument("--model", help=MODEL_HELP)
    evaluate.add_argument("--general", help="held-out general corpus (perplexity)")
    evaluate.add_argument("--domain", help="held-out domain corpus (perplexity)")
    evaluate.add_argument("--qa", help="question/answer JSONL ('question', 'answer' fields): greedy exact-match accuracy")
    evaluate.add_argument("--answer-pattern", default=r"####\s*(-?[\d,]*\.?\d+)", help="regex whose first group is the answer")
    evaluate.add_argument("--block-size", type=int, default=128)
    evaluate.add_argument("--max-blocks", type=int, default=64, help="blocks per perplexity corpus (default 64)")
    evaluate.add_argument("--max-questions", type=int, help="cap on QA records")
    evaluate.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks (needs lm-eval installed)")
    evaluate.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto (default): the model's own dtype on GPU (TF32 allowed), float32 on CPU",
    )
    evaluate.add_argument("--output", help="write the results JSON here")
    add_packing_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    demo = commands.add_parser("demo", help="the built-in end-to-end run on the demo model")
    demo.add_argument("--output", default="runs/demo", help="where the demo writes its artifacts (default runs/demo)")
    demo.add_argument(
        "--compare",
        action="store_true",
        help="also train adept and pt_full with 25%% general replay, pt_full, llama_pro, adept_no_stage1, adept_no_stage2",
    )
    demo.add_argument("--steps", type=int, default=40, help="training steps per method (default 40)")
    demo.add_argument("--num-procs", type=int, default=2, help="training ranks (default 2)")
    # The probe and the evaluation cost the same at any step count: these make a quick look (and the test) quicker.
    demo.add_argument("--probe-tokens", type=int, default=4096, help="general tokens the mask probe scores (default 4096; >= 512)")
    demo.add_argument("--max-questions", type=int, default=100, help="domain questions each model answers (default 100)")
    demo.add_argument(
        "--eval-tokens", type=int, default=8192, help="held-out tokens of each corpus each model is scored on (default 8192; >= 128)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse ends a `nargs="*"` positional at the first option, so `sweep RUN.yaml --steps 40 key=value` (overrides
    last, as the usage lines write them) refused key=value: key=value words after the options join the overrides.
    (`parse_intermixed_args`, which launch/train.py's parser uses, does not take subparsers.)"""
    args, extra = parser.parse_known_args(argv)
    late = [word for word in extra if "=" in word and not word.startswith("-")]
    if len(late) < len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, without_local_rank(sys.argv[1:] if argv is None else argv))
    if args.command == "expand":
        if (args.probe or args.uniform) and args.k is None:
            parser.error("--probe and --uniform need --k (how many layers to expand)")
        if args.layers is not None and args.k is not None:
            parser.error("--k goes with --probe or --uniform; with --layers the layers are given explicitly")
        if args.k == "auto" and not args.probe:
            parser.error("--k auto needs --probe: k is chosen from the probe's scores")
        if (args.budget_params is not None or args.budget_fraction is not None) and args.k != "auto":
            parser.error("--budget-params and --budget-fraction go with --k auto; an explicit --k is used as given")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"adept-ds {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
