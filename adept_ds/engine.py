"""Stage 2: the DeepSpeed training engine with unit-wise, importance-adaptive learning rates.

`Trainer` owns one run: it loads the model partitioned by ZeRO-3 from the start, freezes all but
the trainable units, builds one named param group per unit, and every `importance.interval` steps
measures unit importance on general probe batches (from each rank's local partitions) and rescales
the groups' learning rates. Checkpoints are DeepSpeed's own, plus the trainer state
(step, data positions, importance, scales, RNG), so `--resume` continues exactly.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from adept_ds.config import RunConfig
from adept_ds.data import load_blocks, sample_order
from adept_ds.distributed import all_reduce_sum, init_distributed, local_share, on_cpu, rank_zero_first, shutdown_distributed
from adept_ds.families import get_family
from adept_ds.importance import AbsGradAccumulator, unit_importance
from adept_ds.lr import ScaledScheduler, build_base_scheduler, lr_scales
from adept_ds.units import Unit, adept_units, build_param_groups, full_model_units, set_trainable

CHECKPOINT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------
# DeepSpeed config: "auto" values come from the run config, so one file serves any world size.


def resolve_ds_config(path: str | Path, config: RunConfig, world_size: int, gpu: bool) -> dict:
    ds = json.loads(Path(path).read_text())
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"{path}: remove the '{section}' section; adept_ds builds the {section} from the run config "
                f"('{section}:' keys) so that it can give every unit its own learning rate"
            )
    micro, gas = config.train.micro_batch_size, config.train.gradient_accumulation_steps
    auto = {
        ("train_micro_batch_size_per_gpu",): micro,
        ("gradient_accumulation_steps",): gas,
        ("train_batch_size",): micro * gas * world_size,
        ("gradient_clipping",): config.train.gradient_clipping,
        ("bf16", "enabled"): gpu,
        ("fp16", "enabled"): False,
        ("zero_optimization", "offload_optimizer", "pin_memory"): gpu,
        ("zero_optimization", "offload_param", "pin_memory"): gpu,
    }

    def fill(node, keys):
        for key, value in list(node.items()):
            here = (*keys, key)
            if isinstance(value, dict):
                fill(value, here)
            elif value == "auto":
                if here not in auto:
                    raise ValueError(f"{path}: '{'.'.join(here)}' is \"auto\" but adept_ds has no value for it; set it explicitly")
                node[key] = auto[here]

    fill(ds, ())
    for keys in [("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",), ("train_batch_size",), ("gradient_clipping",)]:
        ds.setdefault(keys[0], auto[keys])
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size:
        raise ValueError(
            f"{path}: train_batch_size={ds['train_batch_size']} != micro batch {ds['train_micro_batch_size_per_gpu']} x "
            f'accumulation {ds["gradient_accumulation_steps"]} x world size {world_size}; set them to "auto"'
        )
    if not gpu and ds.get("bf16", {}).get("enabled"):
        raise ValueError(f'{path}: bf16 is enabled but this run is on CPU; use "auto" (fp32 on CPU, bf16 on GPU)')
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything beyond DeepSpeed's own engine state that a resumed run needs."""

    step: int = 0
    samples_seen: int = 0
    """Domain samples consumed (global), i.e. the position in the shuffled sample stream."""
    probe_samples_seen: int = 0
    importance: list[float] | None = None
    scales: list[float] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False, show_progress: bool = True):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        from adept_ds.checkpoint import open_checkpoint
        from adept_ds.demo_model import cache_root
        from adept_ds.expand import read_manifest

        config.validate_paths()
        self.config = config
        self.show_progress = show_progress
        self.output_dir = Path(config.output_dir)
        checkpoint = open_checkpoint(config.model)
        self.family = get_family(checkpoint.config.get("model_type"))
        self.manifest = read_manifest(config.model) if config.spec.expanded else None
        if self.manifest and self.manifest["num_layers"] != checkpoint.config["num_hidden_layers"]:
            raise ValueError(
                f"{config.model}: the manifest describes {self.manifest['num_layers']} layers but the model has "
                f"{checkpoint.config['num_hidden_layers']}"
            )

        self.rank, self.world_size = init_distributed()
        self.gpu = not on_cpu()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        self.ds_config = resolve_ds_config(config.deepspeed, config, self.world_size, self.gpu)
        self.stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        random.seed(config.train.seed)
        np.random.seed(config.train.seed)
        torch.manual_seed(config.train.seed)

        # Data: rank 0 tokenises and fills the Arrow cache; the others then read it.
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        cache = Path(config.data.cache_dir) if config.data.cache_dir else cache_root() / "blocks"
        self.uses_importance = config.adaptive_lr
        corpora = {"domain": config.data.domain, **({"general": config.data.general} if self.uses_importance else {})}
        # Arrow-backed and memory-mapped: batches are read on demand, never the whole corpus.
        self.blocks = {
            name: rank_zero_first(lambda path=path: load_blocks(path, tokenizer, config.data.block_size, cache, config.data.text_field))
            for name, path in corpora.items()
        }
        self.global_batch = config.train.micro_batch_size * config.train.gradient_accumulation_steps * self.world_size
        if len(self.blocks["domain"]) < self.global_batch:
            raise ValueError(
                f"domain corpus {config.data.domain} has {len(self.blocks['domain'])} blocks of {config.data.block_size} tokens, "
                f"fewer than one global batch ({self.global_batch}); add data or lower train.micro_batch_size"
            )

        # Model: with ZeRO-3 the HfDeepSpeedConfig makes from_pretrained load straight into partitions.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config) if self.stage == 3 else None
        dtype = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
        model.config.use_cache = False
        self.units: list[Unit] = self._units(model, checkpoint)
        set_trainable(model, self.units)
        groups = build_param_groups(model, self.units, config.optimizer.lr, config.optimizer.weight_decay)
        self.numels = {name: getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(groups, lr=config.optimizer.lr, betas=config.optimizer.betas, eps=config.optimizer.eps)
        sched = config.scheduler

        def make_scheduler(opt):
            base = build_base_scheduler(
                opt, sched.type, config.optimizer.lr, sched.warmup_steps, config.train.max_steps, sched.min_lr_ratio, sched.warmup_type
            )
            return ScaledScheduler(base, len(groups))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=self.ds_config
        )
        self.params = dict(self.engine.module.named_parameters())
        self.state = TrainState(scales=[1.0] * len(self.units))
        self.writer = None
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        if resume:
            self.load_checkpoint()

    def _units(self, model, checkpoint) -> list[Unit]:
        trains = self.config.spec.trains
        if trains == "copies":
            return adept_units(model, self.family, self.manifest["copied_layers"])
        if trains == "probe_layers":
            from adept_ds.checkpoint import fingerprint_checkpoint
            from adept_ds.probe import layers_from_probe

            layers = layers_from_probe(
                self.config.probe, self.config.k, fingerprint_checkpoint(checkpoint), checkpoint.config["num_hidden_layers"]
            )
            return adept_units(model, self.family, layers)
        return full_model_units(model)

    # -- data ---------------------------------------------------------------------------------

    def _rank_slice(self, indices: list[int], micro: int, size: int) -> list[int]:
        start = (micro * self.world_size + self.rank) * size
        return indices[start : start + size]

    def _batch(self, blocks, indices: list[int]) -> torch.Tensor:
        return blocks[indices]["input_ids"].to(self.device)

    # -- importance ---------------------------------------------------------------------------

    def recompute_importance(self) -> list[float]:
        """Unit importance on the next general probe batches; leaves no gradient behind."""
        cfg = self.config.importance
        general = self.blocks["general"]
        per_batch = cfg.batch_size * self.world_size
        order = sample_order(len(general), self.config.train.seed + 7919, self.state.probe_samples_seen, cfg.batches * per_batch)
        accumulator = AbsGradAccumulator()
        trainable = [name for unit in self.units for name in unit.param_names]

        def share(name: str, grad: bool):
            return local_share(self.params[name], self.stage, grad)

        for batch_index in range(cfg.batches):
            batch = self._batch(general, self._rank_slice(order, batch_index, cfg.batch_size))
            # Each probe batch is its own accumulation boundary: ZeRO reduces (averages over ranks)
            # the gradient of this global probe batch, which we read and then discard.
            self.engine.set_gradient_accumulation_boundary(True)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss, scale_wrt_gas=False)
            accumulator.add({name: share(name, grad=True) for name in trainable})
            self.engine.optimizer.zero_grad()
            self.engine.zero_grad()
        self.engine.set_gradient_accumulation_boundary(None)
        self.state.probe_samples_seen += cfg.batches * per_batch
        local_params = {name: share(name, grad=False) for name in trainable}  # theta does not change between probe batches
        return unit_importance(self.units, local_params, accumulator, self.numels, all_reduce_sum)

    def update_learning_rates(self) -> None:
        importance = self.recompute_importance()
        if all(math.isfinite(value) for value in importance):
            self.state.importance = importance
            self.state.scales = lr_scales(importance, self.config.importance.mapping, self.config.importance.power)
            self.scheduler.set_scales(self.state.scales)
        elif self.rank == 0:
            tqdm.write(f"step {self.state.step}: non-finite unit importance {importance}; keeping the previous learning rates")
        if self.rank == 0:
            record = {
                "step": self.state.step,
                "lr_base": self.scheduler.base_lr(),
                "importance": dict(zip([u.name for u in self.units], importance)),
                "scales": dict(zip([u.name for u in self.units], self.state.scales)),
            }
            with open(self.output_dir / "importance_history.jsonl", "a") as history:
                history.write(json.dumps(record) + "\n")
            for unit, value, scale in zip(self.units, importance, self.state.scales):
                self.writer.add_scalar(f"importance/{unit.name}", value, self.state.step)
                self.writer.add_scalar(f"lr_scale/{unit.name}", scale, self.state.step)

    # -- training -----------------------------------------------------------------------------

    def train_step(self) -> float:
        train = self.config.train
        order = sample_order(len(self.blocks["domain"]), train.seed, self.state.samples_seen, self.global_batch)
        losses = []
        for micro in range(train.gradient_accumulation_steps):
            batch = self._batch(self.blocks["domain"], self._rank_slice(order, micro, train.micro_batch_size))
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        self.state.samples_seen += self.global_batch
        self.state.step += 1
        mean = all_reduce_sum(torch.stack(losses).mean().reshape(1).double()) / self.world_size
        return mean.item()

    def train(self) -> list[float]:
        cfg = self.config
        losses = []
        tokens_per_step = self.global_batch * cfg.data.block_size
        progress = tqdm(
            total=cfg.train.max_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not self.show_progress or self.rank != 0,
        )
        while self.state.step < cfg.train.max_steps:
            if self.uses_importance and self.state.step % cfg.importance.interval == 0:
                self.update_learning_rates()
            started = time.perf_counter()
            loss = self.train_step()
            elapsed = time.perf_counter() - started
            losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss} at step {self.state.step}")
            if self.rank == 0:
                self._log(loss, tokens_per_step / elapsed)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / elapsed:.0f}")
            if cfg.train.save_interval and self.state.step % cfg.train.save_interval == 0:
                self.save_checkpoint()
        progress.close()
        if not (cfg.train.save_interval and self.state.step % cfg.train.save_interval == 0):
            self.save_checkpoint()
        return losses

    def _log(self, loss: float, tokens_per_s: float) -> None:
        step = self.state.step
        record = {"step": step, "loss": loss, "tokens_per_s": tokens_per_s, "lr_base": self.scheduler.base_lr()}
        with open(self.output_dir / "metrics.jsonl", "a") as metrics:
            metrics.write(json.dumps(record) + "\n")
        if step % self.config.train.log_interval == 0:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
            self.writer.add_scalar("lr/base", self.scheduler.base_lr(), step)
            for unit, group in zip(self.units, self.optimizer.param_groups):
                self.writer.add_scalar(f"lr/{unit.name}", group["lr"], step)

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        directory = self.output_dir / CHECKPOINT_DIR
        tag = f"step{self.state.step:08d}"
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={"trainer": self.state.state_dict()})
        torch.save(_rng_state(), directory / tag / f"rng_rank{self.rank}.pt")
        dist.barrier()
        return directory / tag

    def load_checkpoint(self) -> None:
        directory = self.output_dir / CHECKPOINT_DIR
        if not (directory / "latest").is_file():
            raise ValueError(f"--resume: no checkpoint in {directory} (nothing to resume from)")
        tag = (directory / "latest").read_text().strip()
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise ValueError(f"--resume: DeepSpeed could not load checkpoint {directory / tag}")
        self.state.load_state_dict(client_state["trainer"])
        self.scheduler.set_scales(self.state.scales)
        rng_file = directory / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        if self.rank == 0:
            tqdm.write(f"resumed from {directory / tag} at step {self.state.step}")

    def latest_tag(self) -> str:
        return (self.output_dir / CHECKPOINT_DIR / "latest").read_text().strip()

    def close(self, shutdown: bool = True) -> None:
        """Drop the engine (before the process group: see shutdown_distributed) and optionally end the group."""
        if self.writer is not None:
            self.writer.close()
        del self.engine, self.optimizer, self.scheduler, self.params, self._hf_ds_config
        gc.collect()
        if shutdown:
            shutdown_distributed()


def run_training(config: RunConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Train, checkpoint, and (rank 0) export the final model. Returns a summary."""
    from adept_ds.export import export_checkpoint

    trainer = Trainer(config, resume=resume, show_progress=show_progress)
    try:
        losses = trainer.train()
        tag, rank = trainer.latest_tag(), trainer.rank
    finally:
        trainer.close()
    summary = {"losses": losses, "checkpoint": str(Path(config.output_dir) / CHECKPOINT_DIR / tag)}
    if config.train.export and rank == 0:
        summary["export"] = str(
            export_checkpoint(Path(config.output_dir) / CHECKPOINT_DIR, tag, config.model, Path(config.output_dir) / "final")
        )
    return summary
