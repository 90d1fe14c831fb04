"""The forgetting guard: act when general validation loss rises too far above where training started.

After each validation (validation.py) the guard compares the general validation loss with the first one of
the run (step 0): rise = loss / loss_at_step_0 - 1. Above `guard.max_general_increase` it triggers, with
`guard.action`:
- stop: save a checkpoint of this state and stop (exit code 4), saying by how much and what to change;
- rollback: make the best complete checkpoint the run's newest, export it, and stop. Best, by one rule over
  both losses: among the checkpoints whose general rise is within the limit, the lowest domain validation
  loss (learned most without forgetting too much); if none is within it, the lowest general rise. Newer
  checkpoints are moved, not deleted, to `checkpoints/rolled_back/`, so `--resume` continues from the best;
  with this action every checkpoint is validated when saved, and pruning keeps the best one;
- cool: multiply every unit's learning-rate scale by `guard.cool_factor` and go on (the product is kept in
  the trainer state: importance recomputes and resumes keep it). It triggers again at a later validation
  if the loss is still above the limit.
Every trigger is logged (metrics.jsonl, TensorBoard, the console) with the numbers, and kept in the state.
Every rank holds the same all-reduced losses, so all of them take the same decision without a collective.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from adept_ds.training.checkpoints import LATEST, saved_steps, tag_for, write_atomically

EXIT_GUARD = 4


class GuardStopped(RuntimeError):
    """Training stopped by the forgetting guard (after saving, or after rolling back)."""

    exit_code = EXIT_GUARD

    def __init__(self, message: str, rolled_back_to: Path | None = None):
        super().__init__(message)
        self.rolled_back_to = rolled_back_to


def general_rise(history: list[dict], record: dict) -> float:
    """Relative rise of the general validation loss of `record` over the run's first validation."""
    return record["general"] / history[0]["general"] - 1.0


def describe_trigger(history: list[dict], record: dict, limit: float, action: str) -> str:
    first = history[0]
    return (
        f"forgetting guard: general validation loss {record['general']:.4f} at step {record['step']} is "
        f"{general_rise(history, record):+.1%} over step {first['step']}'s {first['general']:.4f} "
        f"(guard.max_general_increase={limit:g}); action {action}"
    )


def best_checkpoint(history: list[dict], limit: float, saved_steps: set[int]) -> dict | None:
    """The validation record of the best saved checkpoint (see the module doc), or None if none is scored."""
    scored = [record for record in history if record["step"] in saved_steps and record["step"] > history[0]["step"]]
    if not scored:
        return None
    within = [record for record in scored if general_rise(history, record) <= limit]
    if within:
        return min(within, key=lambda record: (record["domain"], record["step"]))
    return min(scored, key=lambda record: (record["general"], record["step"]))


def roll_back_to(directory: Path, best_tag: str) -> list[Path]:
    """Make `best_tag` the newest checkpoint: newer ones move to `rolled_back/`, `latest` points at it."""
    aside = directory / "rolled_back"
    aside.mkdir(exist_ok=True)
    moved = []
    for path in sorted(directory.glob("*step*")):
        step_name = path.name.removeprefix("universal-")
        if path.is_dir() and step_name.startswith("step") and step_name > best_tag:
            target = aside / path.name
            if target.exists():  # an earlier rollback moved one of this name: keep both
                target = aside / f"{path.name}.{os.getpid()}"
            os.replace(path, target)
            moved.append(target)
    write_atomically(directory / LATEST, best_tag)
    return moved


class ForgettingGuard:
    """Applies `guard.*` after each validation; `save()` writes a checkpoint, `set_scales()` the LR scales."""

    def __init__(self, config, directory: Path, rank: int, log):
        self.config, self.directory, self.rank, self.log = config, directory, rank, log

    def check(self, state, save, set_scales) -> None:
        guard, history = self.config, state.validation
        record = history[-1] if history else {}
        if not guard.enabled or len(history) < 2 or "general" not in record:
            return
        rise = general_rise(history, record)
        if rise <= guard.max_general_increase:
            return
        message = describe_trigger(history, record, guard.max_general_increase, guard.action)
        if guard.action == "cool":
            state.lr_multiplier *= guard.cool_factor
            state.scales = [scale * guard.cool_factor for scale in state.scales]
            set_scales(state.scales)
            message += f": every unit's learning rate x{guard.cool_factor:g} (x{state.lr_multiplier:g} in all), continuing"
        trigger = {**record, "rise": rise, "action": guard.action, "lr_multiplier": state.lr_multiplier}
        state.guard_triggers.append(trigger)
        if self.rank == 0:
            self.log.metric("guard", {"step": record["step"], "guard": trigger})
            self.log.scalars({"guard/general_rise": rise, "guard/lr_multiplier": state.lr_multiplier}, record["step"])
            tqdm.write(f"step {record['step']}: {message}")
        if guard.action == "stop":
            saved = save()
            raise GuardStopped(
                f"{message}: saved {saved} and stopped (lower optimizer.lr, mix general replay into data.domain, or use guard.action=cool)"
            )
        if guard.action == "rollback":
            self._roll_back(state, message, save)

    def _roll_back(self, state, message: str, save) -> None:
        from adept_ds.runtime.distributed import decided_by_rank_zero

        limit = self.config.max_general_increase

        def roll_back():  # on rank 0, for every rank
            best = best_checkpoint(state.validation, limit, saved_steps(self.directory))
            return None if best is None else (best, len(roll_back_to(self.directory, tag_for(best["step"]))))

        chosen = decided_by_rank_zero(roll_back)
        if chosen is None:
            saved = save()
            raise GuardStopped(f"{message}: no earlier validated checkpoint to roll back to; saved {saved} and stopped")
        best, moved = chosen
        rise = general_rise(state.validation, best)
        path = self.directory / tag_for(best["step"])
        raise GuardStopped(
            f"{message}: rolled back to {path.name} (general validation loss {best['general']:.4f}, {rise:+.1%}, "
            f"{'within' if rise <= limit else 'the least over'} the limit; domain {best.get('domain', float('nan')):.4f}); "
            f"moved {moved} newer checkpoint(s) to {self.directory / 'rolled_back'}; stopped",
            path,
        )

    def protected(self, state) -> set[str]:
        """With action rollback, the best validated checkpoint survives pruning (it may be rolled back to)."""
        if not (self.config.enabled and self.config.action == "rollback" and state.validation):
            return set()
        best = best_checkpoint(state.validation, self.config.max_general_increase, saved_steps(self.directory))
        return set() if best is None else {tag_for(best["step"])}
