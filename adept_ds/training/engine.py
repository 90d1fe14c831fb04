"""Stage 2: the DeepSpeed training engine with unit-wise, importance-adaptive learning rates.

`Trainer` owns one run: it loads the model partitioned by ZeRO-3 from the start, freezes all but
the trainable units (keeping the frozen backbone whole on every rank where the memory plan allows:
frozen_weights.py), builds one named param group per unit, and every `importance.interval` steps
measures unit importance on general probe batches (from each rank's local partitions) and rescales
the groups' learning rates. Checkpoints are DeepSpeed's own without the frozen weights, plus the
trainer state (step, data positions, importance, scales, RNG), sealed as complete only once every
rank has written (checkpoints.py), so `--resume` continues exactly from the newest complete
one, on the backbone it names by fingerprint. Rank 0 answers every filesystem question (which checkpoint
to resume, whether a step is saved) for all ranks.
Every `eval.interval` steps (and at step 0 and the end) it validates on held-out general and domain blocks
(validation.py), and the forgetting guard acts on the general loss (guard.py).
A non-finite loss is caught before the optimizer step, in the one all-reduce a step makes, and handled by
`train.nonfinite`; SIGTERM checkpoints at the next step boundary; an exception on one rank ends the job
at once, without any collective (faults.py).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from adept_ds.data.blocks import Batch, gather_batch, store_batch
from adept_ds.data.sampler import Mixture, sample_order
from adept_ds.model.lm_loss import use_chunked_loss
from adept_ds.model.units import Unit, adept_units, build_param_groups, full_model_units, set_trainable
from adept_ds.run.config import RunConfig
from adept_ds.run.ds_config import half_precision
from adept_ds.run.zeropp import describe as describe_zeropp
from adept_ds.run.zeropp import use_cpu_quantizer
from adept_ds.runtime.distributed import (
    agreed_minimum,
    all_reduce_sum,
    decided_by_rank_zero,
    init_distributed,
    local_share,
    on_cpu,
    shutdown_distributed,
)
from adept_ds.runtime.faults import EXIT_STOPPED, RankRegistry, StopRequest, exit_after_failure, fault_point
from adept_ds.runtime.run_log import RunLog
from adept_ds.training.activation_checkpointing import checkpoint_layers
from adept_ds.training.checkpoints import (
    CHECKPOINT_DIR,
    TrainState,
    incomplete_reason,
    mark_complete,
    prune,
    rng_state,
    set_rng_state,
    tag_for,
)
from adept_ds.training.frozen_weights import replicate_frozen
from adept_ds.training.guard import ForgettingGuard, GuardStopped
from adept_ds.training.importance import AbsGradAccumulator, unit_importance
from adept_ds.training.lr import ScaledScheduler, build_base_scheduler, lr_scales, normalised_importance
from adept_ds.training.resolve import ResolvedRun, resolve_run
from adept_ds.training.throughput import describe_flops, device_peak, measure_matmul_tflops, step_figures
from adept_ds.training.universal import (
    convert_before_start,
    derived_seed,
    group_hyperparameters,
    is_universal,
    repair_after_load,
    resume_tag,
    source_tag,
)
from adept_ds.training.validation import Validator, plot_validation


class NonFiniteLoss(RuntimeError):
    """Training stopped (after saving) on a non-finite loss, per `train.nonfinite`."""


class Stopped(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint."""

    exit_code = EXIT_STOPPED


# ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, run: ResolvedRun, show_progress: bool = True):
        """`run`: resolve_run's (training/resolve.py), made before the process group exists: every input is checked
        then, so a bad value fails fast on every rank. Its `resume` says whether to continue the newest complete
        checkpoint (True), start new (False: refused where checkpoints exist), or either ("auto": `--auto-resume`)."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        from adept_ds.runtime.distributed import import_deepspeed

        deepspeed = import_deepspeed()

        if not isinstance(run, ResolvedRun) or run.data is None:  # the 0.1 call was Trainer(config, resume=...)
            raise TypeError(f"Trainer takes a run resolved with its data, Trainer(resolve_run(config, resume=...)), not {run!r:.80}")
        self.show_progress = show_progress
        self.config = config = run.config
        self.output_dir = Path(config.output_dir)
        self.gpu = not on_cpu()
        self.family, self.trainable_layers = run.family, run.trainable_layers
        for note in run.notes if os.environ.get("RANK", "0") == "0" else []:
            print(note, flush=True)
        data = run.data
        self.sources, self.domain = list(data.sources), list(data.domain)
        self.uses_importance = config.adaptive_lr
        self.general, self.general_blocks = data.general, data.general_blocks

        # A checkpoint of another world size becomes a universal one now: no collective waits through the conversion.
        convert_before_start(run.resume.checkpoints, run.resume.mode, run.resume.backbone, run.world_size)

        self.rank, self.world_size = init_distributed(config.train.timeout_minutes, config.train.threads)
        if self.world_size != run.world_size:
            raise ValueError(
                f"the run was resolved for {run.world_size} ranks but {self.world_size} started: resolve it for the launched world"
            )
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        # Every rank takes the layout planned for the smallest memory of any rank (nodes may differ).
        local = run.layout.memory
        agreed = agreed_minimum(-1 if local is None else local)
        agreed = None if agreed < 0 else agreed
        if agreed != local:  # re-planned: its notes describe the config this run uses
            run = run.for_memory(agreed)
        self.run, self.layout, self.ds_config = run, run.layout, run.ds_config
        self.stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if self.rank == 0:
            for note in run.ds_notes:
                print(f"deepspeed config: {note}", flush=True)
            print(f"memory: {self.layout.note}", flush=True)
            print(f"zero++: {describe_zeropp(self.ds_config, config, self.world_size, self.layout.frozen_weights)}", flush=True)
            print(f"attention: {run.attention_note}", flush=True)
        self.packing = run.packing
        half = half_precision(self.ds_config)
        self.peak = device_peak(config.train.peak_tflops, self.gpu, half, self._measured_peak)
        if self.rank == 0:
            print(describe_flops(run.flops, self.peak, self.world_size), flush=True)
        random.seed(config.train.seed)
        np.random.seed(config.train.seed)
        torch.manual_seed(config.train.seed)
        self.global_batch = config.train.global_batch(self.world_size)
        self.mixture = Mixture(list(data.domain_sizes), [source.weight for source in self.sources], config.train.seed)

        # Model: with ZeRO-3 the HfDeepSpeedConfig makes from_pretrained load straight into partitions.
        if not self.gpu and self.ds_config.get("zero_optimization", {}).get("zero_quantized_weights"):
            use_cpu_quantizer()  # ZeRO++ qwZ: DeepSpeed's quantizer is CUDA-only (zeropp.py)
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config) if self.stage == 3 else None
        dtype = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype, attn_implementation=run.attention)
        model.config.use_cache = False  # also what lets transformers build the document mask from position ids
        model.train()  # from_pretrained gives eval mode; HF checkpoints layers only in train mode (dropout is 0 by default)
        if config.train.chunked_loss and not self.ds_config.get("fp16", {}).get("enabled"):
            use_chunked_loss(model, self.family)  # fp32 and bf16; fp16 keeps HF's loss (adept_ds/model/lm_loss.py)
        self.units: list[Unit] = self._units(model)
        # What a checkpoint belongs to: it holds no frozen weight, so it only resumes on this backbone and units.
        self.run_identity = {
            "backbone_model": str(Path(config.model.path).absolute()),
            **run.resume.backbone,
            "units": [unit.name for unit in self.units],
            "global_batch": self.global_batch,
            "probe_batch": config.importance.batch_size * self.world_size,
        }
        # Decided before the engine exists: a checkpoint of another world size loads as a universal one.
        tag = decided_by_rank_zero(lambda: resume_tag(run.resume.checkpoints, run.resume.mode, self.run_identity, self.world_size))
        if tag is not None and is_universal(tag):
            self.ds_config = {**self.ds_config, "checkpoint": {**self.ds_config.get("checkpoint", {}), "load_universal": True}}
        set_trainable(model, self.units)
        self.numels = {name: getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters()}
        if self.stage == 3 and self.layout.frozen_weights == "replicated":
            replicate_frozen(model)  # gathered once; ZeRO-3 then partitions and gathers only the trainable units
        if config.train.activation_checkpointing:
            checkpoint_layers(model, self.family, [name for unit in self.units for name in unit.param_names])
        groups = build_param_groups(model, self.units, config.optimizer.lr, config.optimizer.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=config.optimizer.lr, betas=config.optimizer.betas, eps=config.optimizer.eps)

        def make_scheduler(opt):
            return ScaledScheduler(build_base_scheduler(opt, config.scheduler, config.optimizer.lr, config.train.max_steps), len(groups))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=self.ds_config
        )
        self.params = dict(self.engine.module.named_parameters())
        self.state = TrainState(scales=[1.0] * len(self.units), source_samples=[0] * len(self.sources))
        self.log: RunLog | None = None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.registry = RankRegistry(self.output_dir, self.rank, self.world_size)
        self.stop_request = StopRequest(self.registry)
        self.stop_agreed = False
        dist.barrier()  # every rank's record is written before any rank may look for dead peers
        if self.rank == 0:
            (self.output_dir / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            self.log = RunLog(self.output_dir, config.report, config.to_dict())
        self.validator = Validator(
            config, list(data.held_out), self.rank, self.world_size, self.device, all_reduce_sum, self.log, self.packing
        )
        self.guard = ForgettingGuard(config.guard, self.output_dir / CHECKPOINT_DIR, self.rank, self.log)
        self.saved: Path | None = None  # the checkpoint holding the current state (last saved or resumed from)
        if tag is not None:
            self.load_checkpoint(tag)

    def _measured_peak(self) -> float:
        """Each rank's matmul rate, measured by all at once (they share the cores as in training), averaged."""
        dist.barrier()
        rate = measure_matmul_tflops()
        return all_reduce_sum(torch.tensor([rate], dtype=torch.float64)).item() / self.world_size

    def _units(self, model) -> list[Unit]:
        if self.trainable_layers is None:
            return full_model_units(model)
        return adept_units(model, self.family, list(self.trainable_layers))

    # -- data ---------------------------------------------------------------------------------

    def _rank_slice(self, indices: list, micro: int, size: int) -> list:
        """This rank's part of micro-batch `micro` of a global batch: the ranks' parts are disjoint and cover it."""
        start = (micro * self.world_size + self.rank) * size
        return indices[start : start + size]

    def forward_loss(self, batch: Batch) -> torch.Tensor:
        """The engine's mean next-token loss of `batch` (with its position ids when the document mask is on)."""
        return self.engine(**batch.model_inputs()).loss

    # -- importance ---------------------------------------------------------------------------

    def recompute_importance(self) -> list[float]:
        """Unit importance on the next general probe batches; leaves no gradient behind."""
        cfg = self.config.importance
        per_batch = cfg.batch_size * self.world_size
        order = sample_order(self.general_blocks, self.config.train.seed + 7919, self.state.probe_samples_seen, cfg.batches * per_batch)
        accumulator = AbsGradAccumulator()
        trainable = [name for unit in self.units for name in unit.param_names]

        def share(name: str, grad: bool):
            return local_share(self.params[name], self.stage, grad)

        for batch_index in range(cfg.batches):
            batch = store_batch(self.general, self._rank_slice(order, batch_index, cfg.batch_size), self.packing).to(self.device)
            # Each probe batch is its own accumulation boundary: ZeRO reduces (averages over ranks)
            # the gradient of this global probe batch, which we read and then discard.
            self.engine.set_gradient_accumulation_boundary(True)
            loss = self.forward_loss(batch)
            self.engine.backward(loss, scale_wrt_gas=False)
            accumulator.add({name: share(name, grad=True) for name in trainable})
            self.engine.optimizer.zero_grad()
            self.engine.zero_grad()
        self.engine.set_gradient_accumulation_boundary(None)
        self.state.probe_samples_seen += cfg.batches * per_batch
        local_params = {name: share(name, grad=False) for name in trainable}  # theta does not change between probe batches
        return unit_importance(self.units, local_params, accumulator, self.numels, all_reduce_sum)

    def update_learning_rates(self) -> None:
        cfg, names = self.config.importance, [unit.name for unit in self.units]
        importance = self.recompute_importance()
        finite = all(math.isfinite(value) for value in importance)
        normalised = normalised_importance(importance, cfg.normalize, names) if finite else None
        if finite:
            self.state.importance = importance
            adaptive = lr_scales(importance, cfg.mapping, cfg.power, cfg.normalize, names)
            # The matched-LR ablation: ADEPT's mean LR, without its adaptivity.
            scales = [sum(adaptive) / len(adaptive)] * len(adaptive) if self.config.spec.matched_lr else adaptive
            self.state.scales = [scale * self.state.lr_multiplier for scale in scales]  # the guard's cooling stays
            self.scheduler.set_scales(self.state.scales)
        elif self.rank == 0:
            tqdm.write(f"step {self.state.step}: non-finite unit importance {importance}; keeping the previous learning rates")
        if self.rank == 0:
            record = {
                "step": self.state.step,
                "lr_base": self.scheduler.base_lr(),
                "importance": dict(zip(names, importance)),
                "normalized": dict(zip(names, normalised)) if normalised else None,
                "scales": dict(zip(names, self.state.scales)),
            }
            self.log.importance(record)
            for index, (name, value, scale) in enumerate(zip(names, importance, self.state.scales)):
                self.log.scalars({f"importance/{name}": value, f"lr_scale/{name}": scale}, self.state.step)
                if normalised:
                    self.log.scalars({f"importance_normalized/{name}": normalised[index]}, self.state.step)

    # -- training -----------------------------------------------------------------------------

    def train_step(self) -> float | None:
        """One optimizer step over the next global batch; None when the batch was dropped (non-finite loss)."""
        train = self.config.train
        # The same global batch on every rank (sources and blocks), of which each rank takes its slice.
        pairs, source_samples = self.mixture.draw(self.state.source_samples, self.global_batch)
        last = train.gradient_accumulation_steps - 1
        losses, slices = [], []
        for micro in range(train.gradient_accumulation_steps):
            mine = self._rank_slice(pairs, micro, train.micro_batch_size)
            batch = gather_batch(self.domain, mine, self.packing).to(self.device)
            loss = self.forward_loss(batch)
            fault_point("backward", self.state.step + 1, self.rank)
            # A NaN loss's backward only writes gradients, which a dropped batch discards before any update.
            self.engine.set_gradient_accumulation_boundary(micro == last)
            self.engine.backward(loss)
            losses.append(loss.detach())  # kept on the device: no host sync per micro-batch
            slices.append(mine)
            if micro < last:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        # One all-reduce per step, before the update: the mean loss, how many micro-batch losses were not finite,
        # and whether any rank was asked to stop. Every rank acts on these agreed values, never on its own
        # (a signal may set its flag after the all-reduce), so all take the same branch.
        local = torch.stack(losses).double()
        requested = torch.tensor(float(self.stop_request.requested), dtype=torch.float64, device=local.device)
        totals = all_reduce_sum(torch.stack([local.mean(), (~torch.isfinite(local)).sum().double(), requested]))
        self.stop_agreed = bool(totals[2] > 0)
        if totals[1] > 0:
            self._drop_batch(local.tolist(), slices, source_samples)
            return None
        self.engine.step()  # the boundary: the optimizer step
        self.state.samples_seen += self.global_batch
        self.state.source_samples = source_samples
        self.state.step += 1
        return (totals[0] / self.world_size).item()

    def _drop_batch(self, losses: list[float], slices: list[list[tuple[int, int]]], source_samples: list[int]) -> None:
        """Discard this global batch: its accumulated gradients are thrown away and no update is made.

        Without the boundary `engine.step()`, zeroing the gradients also resets ZeRO's accumulation, so the next
        step's first micro-batch starts it afresh (as after a probe batch in `recompute_importance`)."""
        self.engine.optimizer.zero_grad()
        self.engine.zero_grad()
        for micro, (loss, pairs) in enumerate(zip(losses, slices)):
            if not math.isfinite(loss):
                tqdm.write(
                    f"rank {self.rank}: non-finite loss {loss} at step {self.state.step + 1}, micro-batch {micro}, "
                    f"domain blocks {self._describe(pairs)} (sample stream position {self.state.samples_seen})"
                )
        if self.config.train.nonfinite == "stop" or self.state.skipped_steps >= self.config.train.max_skipped_steps:
            saved = self.save_checkpoint()  # the state before this batch: weights never saw it
            reason = (
                "train.nonfinite=stop"
                if self.config.train.nonfinite == "stop"
                else f"{self.state.skipped_steps} batches already skipped (train.max_skipped_steps)"
            )
            raise NonFiniteLoss(
                f"non-finite loss at step {self.state.step + 1} (sample stream position {self.state.samples_seen}); "
                f"stopped ({reason}) after saving {saved}. Fix the data or resume with train.nonfinite=skip"
            )
        if self.rank == 0:
            self.log.metric("skipped", {"step": self.state.step + 1, "skipped": True, "position": self.state.samples_seen})
        self.state.samples_seen += self.global_batch
        self.state.source_samples = source_samples
        self.state.skipped_steps += 1

    def _describe(self, pairs: list[tuple[int, int]]) -> list:
        """Block indices, prefixed with their source's name in a mixture."""
        if len(self.sources) == 1:
            return [index for _, index in pairs]
        return [f"{self.sources[source].name}:{index}" for source, index in pairs]

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
        measured_at = None  # a dropped batch retries the same step: measure importance once per step
        self.validate_if_due()  # at step 0: the guard's reference
        while self.state.step < cfg.train.max_steps:
            if self.uses_importance and self.state.step % cfg.importance.interval == 0 and measured_at != self.state.step:
                self.update_learning_rates()
                measured_at = self.state.step
            started = time.perf_counter()
            loss = self.train_step()
            if loss is None:
                continue
            elapsed = time.perf_counter() - started
            losses.append(loss)
            if self.rank == 0:
                figures = step_figures(self.run.flops, elapsed, self.world_size, self.peak)
                self._log(loss, tokens_per_step / elapsed, figures)
                progress.update(1)
                mfu = {"mfu": f"{figures['mfu']:.1%}"} if "mfu" in figures else {}
                progress.set_postfix(
                    loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / elapsed:.0f}", **mfu, **self.validator.postfix(self.state)
                )
            self.validate_if_due()
            if self.stop_agreed:
                saved = self.save_checkpoint()
                signal_name = self.stop_request.signal_name or "a peer's stop request"
                raise Stopped(f"stopped by {signal_name} at step {self.state.step} after saving {saved}")
            if cfg.train.save_interval and self.state.step % cfg.train.save_interval == 0:
                self.save_checkpoint()
        progress.close()
        self.validate_if_due()  # a resumed run that was already at max_steps
        self.save_checkpoint()
        if self.rank == 0 and self.validator.held_out:
            plot_validation({"run": self.output_dir}, self.output_dir / "validation.png")
        return losses

    def validate_if_due(self) -> None:
        """Validation (validation.py), then the forgetting guard (guard.py), which may stop the run."""
        if self.validator.due(self.state):
            self.validator.run(self.engine, self.forward_loss, self.state)
            self.guard.check(self.state, self.save_checkpoint, self.scheduler.set_scales)

    def _log(self, loss: float, tokens_per_s: float, figures: dict[str, float]) -> None:
        step = self.state.step
        tokens = {source.name: count * self.config.data.block_size for source, count in zip(self.sources, self.state.source_samples)}
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        record = {"step": step, "loss": loss, "tokens_per_s": tokens_per_s, "lr_base": self.scheduler.base_lr(), "lr_max": max(lrs)}
        self.log.metric("train", {**record, **figures, "lr_multiplier": self.state.lr_multiplier, "tokens": tokens})
        if step % self.config.train.log_interval == 0:
            self.log.scalars({"train/loss": loss, "train/tokens_per_s": tokens_per_s, "lr/base": self.scheduler.base_lr()}, step)
            self.log.scalars({f"train/{name}": value for name, value in figures.items()}, step)
            self.log.scalars({f"data/tokens/{name}": count for name, count in tokens.items()}, step)
            self.log.scalars({f"lr/{unit.name}": lr for unit, lr in zip(self.units, lrs)}, step)

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """DeepSpeed's checkpoint plus our state and RNG; sealed (and `latest` moved) only once every rank wrote."""
        directory = self.output_dir / CHECKPOINT_DIR
        path = directory / tag_for(self.state.step)

        def already_saved() -> bool:
            if incomplete_reason(path) is None:
                return True
            if path.exists():
                shutil.rmtree(path)  # the remains of a write that was killed
            return False

        if decided_by_rank_zero(already_saved):  # rank 0 looks, for every rank; returns after its cleanup
            self.saved = path
            return path  # this very state is already saved (e.g. resumed at the end)
        # The frozen weights are the model training started from (checked by fingerprint on resume): not saved.
        self.engine.save_checkpoint(
            str(directory),
            tag=path.name,
            client_state={"trainer": self.state.state_dict()},
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        fault_point("checkpoint_written", self.state.step, self.rank)
        dist.barrier()
        if self.rank == 0:
            mark_complete(path, self.state.step, self.world_size, self.run_identity)
            for deleted in prune(directory, self.config.train.keep_checkpoints, self.guard.protected(self.state)):
                tqdm.write(f"deleted checkpoint {deleted.name} (train.keep_checkpoints={self.config.train.keep_checkpoints})")
        dist.barrier()
        self.saved = path
        return path

    def load_checkpoint(self, tag: str) -> None:
        """Continue from checkpoint `tag` (chosen by rank 0 for every rank: `universal.resume_tag`)."""
        directory = self.output_dir / CHECKPOINT_DIR
        path = directory / tag
        universal = is_universal(tag)
        hyperparameters = group_hyperparameters(self.engine.optimizer)
        # Not strict: the checkpoint's module state lacks the frozen weights, which the model already holds.
        loaded, client_state = self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
        if loaded is None:
            raise ValueError(f"--resume: DeepSpeed could not load checkpoint {path}")
        self.state.load_state_dict(client_state["trainer"])
        if universal:
            repair_after_load(self.engine, hyperparameters)
            seed = derived_seed(self.config.train.seed, self.state.step, self.rank)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            path = directory / source_tag(tag)  # the state is that checkpoint's: later saves and export name it
        else:
            set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))
        self.scheduler.set_scales(self.state.scales)
        self.saved = path
        if self.rank == 0:
            resumed = {"checkpoint": path.name, "world_size": self.world_size, "universal": universal}
            self.log.metric("resume", {"step": self.state.step, "resume": resumed})
            tqdm.write(f"resumed from {path} (the newest complete checkpoint) at step {self.state.step}")

    def latest_tag(self) -> str:
        """The tag of the checkpoint holding the current state (`train()` ends by saving one)."""
        return self.saved.name

    def close(self, shutdown: bool = True) -> None:
        """Drop the engine (before the process group: see shutdown_distributed) and optionally end the group."""
        if self.log is not None:
            self.log.close()
        self.stop_request.restore()
        del self.engine, self.optimizer, self.scheduler, self.params, self._hf_ds_config
        if shutdown:
            shutdown_distributed()  # collects them first
        else:
            gc.collect()


def run_training(config: RunConfig, resume: bool | str = False, show_progress: bool = True) -> dict:
    """Train, checkpoint, and (rank 0) export the final model. Returns a summary. `resume`: see `Trainer`."""
    from adept_ds.training.export import export_checkpoint, export_once

    try:
        trainer = Trainer(resolve_run(config, resume=resume, show_progress=show_progress), show_progress=show_progress)
    except ValueError:
        # Refused, on every rank (a check before the group, or rank 0's decision broadcast to all): the group goes
        # now, not at interpreter exit, where a gloo thread outliving it can abort the process (exit -6, not 2).
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    try:
        losses = trainer.train()
    except GuardStopped as stop:
        trainer.close()  # every rank took the same decision on the same all-reduced losses: a normal teardown
        if config.train.export and stop.rolled_back_to is not None:  # the run's result: the best checkpoint
            # One rank exports, the others wait on the filesystem, not in a collective a big export would outlast:
            # launchers kill every rank once one exits non-zero, so none may exit before the export is done.
            export_once(
                Path(config.output_dir) / CHECKPOINT_DIR, stop.rolled_back_to.name, config.model.path, Path(config.output_dir) / "final"
            )
        raise
    except (Stopped, NonFiniteLoss):
        trainer.close()  # every rank stopped at the same step, after saving together: a normal teardown
        raise
    except Exception:
        if trainer.world_size == 1:  # no peer waits in a collective: an ordinary exception its caller may handle
            trainer.close()
            raise
        if trainer.log is not None:
            trainer.log.flush()
        exit_after_failure(trainer.registry)  # this rank's failure, or a peer's: no collective may follow
    tag, rank = trainer.latest_tag(), trainer.rank
    trainer.registry.finished()  # from here on, this rank exiting is not a failure its peers must report
    trainer.close()
    summary = {"losses": losses, "checkpoint": str(Path(config.output_dir) / CHECKPOINT_DIR / tag)}
    if config.train.export and rank == 0:
        summary["export"] = str(
            export_checkpoint(Path(config.output_dir) / CHECKPOINT_DIR, tag, config.model.path, Path(config.output_dir) / "final")
        )
    return summary
