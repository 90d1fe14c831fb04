"""Validation during training: loss and perplexity on held-out general and domain blocks, over all ranks.

Held-out blocks come from `data.general_eval` / `data.domain_eval` when given (their first blocks), else from
the tail of the training corpora: the last blocks of the general probe corpus (the importance probe then
draws only the blocks before them) and of the first domain source (which training then never draws). The
same blocks are scored at every validation, so the curve moves only with the model.

How many: `eval.max_tokens` per corpus, or by default 2 % of the tokens trained per interval, at least one
block per rank and at most 4M tokens. Per token a validation forward costs about half an ADEPT step (whose
backward stops at the lowest copy; less for pt_full): measured 2.0-2.3 % of training time on the demo at the default
interval (benchmarks/validation_cost.py).

The score is the token-weighted mean next-token loss: each rank sums `loss x predicted tokens` over its share
of the blocks (`blocks[rank::world]`), under `no_grad`, and one all-reduce adds the sums. With the document mask
the blocks carry their position ids, as in training, and labels dropped at document starts are not counted. Every rank makes the
same number of forwards (under ZeRO-3 each forward gathers weights collectively): a rank out of blocks runs
an uncounted one. The forward is the training one (labels given), so the chunked loss keeps the vocab-wide
logits out of memory here too. At the end of a run the curves are drawn to `validation.png` (`plot_validation`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adept_ds.data.blocks import Packing, gather_batch
from adept_ds.data.token_store import TokenStore
from adept_ds.runtime.run_log import last_per_step, read_records

AUTO_FRACTION = 0.02
"""Default validation tokens per corpus, as a share of the tokens trained per interval."""
AUTO_MAX_TOKENS = 4 * 2**20


def validation_blocks(config, world_size: int) -> int:
    """Blocks per validation corpus (eval.max_tokens, or its default): at least one per rank."""
    block = config.data.block_size
    tokens = config.eval.max_tokens
    if not tokens:
        tokens = min(AUTO_MAX_TOKENS, AUTO_FRACTION * config.eval.interval * config.train.global_batch(world_size) * block)
    return max(world_size, int(tokens // block))


@dataclass(frozen=True)
class HeldOut:
    """Blocks [start, start + count) of a token store, scored at every validation."""

    name: str
    store: TokenStore
    start: int
    count: int

    def rank_blocks(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        return [(0, self.start + index) for index in range(rank, self.count, world_size)]


def hold_out_tail(name: str, store: TokenStore, count: int, keep: int, path: str, setting: str) -> tuple[HeldOut, int]:
    """The last `count` blocks of `store` as a held-out set, and how many blocks remain before them.

    At least `keep` blocks must remain for training (or probing); else say what to change."""
    remaining = len(store) - count
    if remaining < keep:
        raise ValueError(
            f"{setting}={path!r} has {len(store)} blocks of {store.block_size} tokens; holding out {count} for validation "
            f"leaves {max(remaining, 0)}, fewer than the {keep} needed. Give a separate held-out corpus "
            f"(data.{name}_eval), lower eval.max_tokens, or set eval.interval=0"
        )
    return HeldOut(name, store, remaining, count), remaining


def head_of(name: str, store: TokenStore, count: int) -> HeldOut:
    """The first `count` blocks (or all) of a separate held-out corpus."""
    return HeldOut(name, store, 0, min(count, len(store)))


def validation_loss(forward_loss, held_out: HeldOut, batch_size: int, rank: int, world_size: int, device, reduce, packing: Packing) -> dict:
    """{"loss", "perplexity", "tokens" (predicted)}: the token-weighted mean loss of the held-out blocks over all ranks.

    `forward_loss(batch)` returns the mean next-token loss of a `Batch` (data/blocks.py) laid out as `packing` says."""
    mine = held_out.rank_blocks(rank, world_size)
    forwards = math.ceil(math.ceil(held_out.count / world_size) / batch_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for index in range(forwards):
            pairs = mine[index * batch_size : (index + 1) * batch_size]
            batch = gather_batch([held_out.store], pairs or [(0, held_out.start)], packing).to(device)
            loss = forward_loss(batch)
            if pairs:  # else an uncounted forward, so every rank gathers as often as the others
                predicted = batch.predicted
                sums += torch.stack([loss.double() * predicted, torch.tensor(predicted, dtype=torch.float64, device=device)])
    total_loss, tokens = reduce(sums).tolist()
    loss = total_loss / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


def held_out_sets(
    config, world_size: int, domain: list[TokenStore], general: TokenStore | None, store
) -> tuple[list[HeldOut], list[int], int | None]:
    """The validation sets; how many blocks of each domain source training may draw; and how many of the general
    store's first blocks the importance probe may draw (None: unchanged). `store(path, max_tokens)` opens a corpus."""
    data = config.data
    sizes = [len(source) for source in domain]
    if not config.eval.interval:
        return [], sizes, None
    count = validation_blocks(config, world_size)
    held_out, probe_limit = [], None
    if data.general_eval:
        held_out.append(head_of("general", store(data.general_eval, count * data.block_size), count))
    elif general is not None:  # the probe corpus's tail; the importance probe draws only what precedes it
        held, probe_limit = hold_out_tail("general", general, count, 1, data.general, "data.general")
        held_out.append(held)
    elif data.general:  # neither trained on nor probed: its first blocks
        held_out.append(head_of("general", store(data.general, count * data.block_size), count))
    if data.domain_eval:
        held_out.append(head_of("domain", store(data.domain_eval, count * data.block_size), count))
    else:
        path = data.domain_sources()[0].path
        held, sizes[0] = hold_out_tail("domain", domain[0], count, config.train.global_batch(world_size), path, "data.domain")
        held_out.append(held)
    return held_out, sizes, probe_limit


class Validator:
    """Runs the validations of one training run and keeps their losses in the trainer state."""

    def __init__(self, config, held_out: list[HeldOut], rank: int, world_size: int, device, reduce, log, packing: Packing):
        self.config, self.held_out, self.packing = config, held_out, packing
        self.rank, self.world_size, self.device, self.reduce, self.log = rank, world_size, device, reduce, log

    def due(self, state) -> bool:
        """At step 0, every eval.interval steps, at the last step, and (guard.action=rollback) at every save."""
        if not self.held_out or (state.validation and state.validation[-1]["step"] == state.step):
            return False
        config, step = self.config, state.step
        if not state.validation:
            return True  # the guard's reference: step 0, or the first validation of a resumed run
        saving = config.guard.action == "rollback" and config.train.save_interval and step % config.train.save_interval == 0
        return step % config.eval.interval == 0 or step == config.train.max_steps or bool(saving)

    def run(self, engine, forward_loss, state) -> None:
        """Loss on every held-out set, over all ranks (`forward_loss(batch)`: the engine's, as training's): appended to
        `state.validation` and logged (rank 0)."""
        started = time.perf_counter()
        engine.eval()
        batch_size = self.config.train.micro_batch_size
        results = {
            held.name: validation_loss(forward_loss, held, batch_size, self.rank, self.world_size, self.device, self.reduce, self.packing)
            for held in self.held_out
        }
        engine.train()
        history = state.validation
        history.append({"step": state.step, **{name: result["loss"] for name, result in results.items()}})
        if self.rank == 0:
            seconds = time.perf_counter() - started
            self.log.validation(state.step, results, seconds)
            parts = []
            for name, result in results.items():
                rise = f" ({history[-1][name] / history[0][name] - 1:+.1%} vs step {history[0]['step']})" if len(history) > 1 else ""
                parts.append(f"{name} loss {result['loss']:.4f}{rise}, ppl {result['perplexity']:.2f}")
            tqdm.write(f"step {state.step}: validation {'; '.join(parts)} ({seconds:.1f} s)")

    @staticmethod
    def postfix(state) -> dict:
        """The last validation's losses for the progress line."""
        last = state.validation[-1] if state.validation else {}
        return {f"val_{name}": f"{last[name]:.3f}" for name in ("general", "domain") if name in last}


def validation_records(run_dir: Path) -> list[dict]:
    """The validation records of a run's metrics.jsonl, the last per step (a resumed run may repeat one)."""
    return [{"step": record["step"], **record["validation"]} for record in last_per_step(read_records(run_dir, "validation"))]


def plot_validation(runs: dict[str, Path], path: Path) -> bool:
    """General and domain validation loss against step, one line per run (False if no run validated)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    curves = {method: validation_records(run_dir) for method, run_dir in runs.items()}
    if not any(curves.values()):
        return False
    figure, panels = plt.subplots(1, 2, figsize=(10, 3.5))
    for axes, corpus in zip(panels, ("general", "domain")):
        for method, records in curves.items():
            points = [(r["step"], r[corpus]["loss"]) for r in records if corpus in r]
            if points:
                axes.plot(*zip(*points), marker="o", markersize=3, label=method)
        axes.set_xlabel("step")
        axes.set_ylabel(f"{corpus} validation loss")
        axes.set_title(f"held-out {corpus} text" + (" (forgetting: up is bad)" if corpus == "general" else ""), fontsize=9)
        if len(curves) > 1:
            axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
