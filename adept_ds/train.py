"""`deepspeed launch/train.py --config RUN.yaml [key.sub=value ...] [--resume | --auto-resume]` (also `deepspeed --module adept_ds.train`).

Parses, validates (before any process group starts), trains, exports.
Exit codes: 0 done; 2 bad input; 4 stopped by the forgetting guard (guard.action stop or rollback); 143 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (rerun
with --resume or --auto-resume); 3 a peer rank died or failed; 1 any other failure (a non-finite loss
under train.nonfinite=stop; an error on this rank, which then exits at once without any collective).
"""

from __future__ import annotations

import argparse
import os
import sys


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # the same collective outcome on every rank: say it once
        print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from adept_ds.run.config import load_run_config
    from adept_ds.training.engine import NonFiniteLoss, Stopped, run_training
    from adept_ds.training.guard import GuardStopped

    parser = argparse.ArgumentParser(prog="train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (launch/configs/*.yaml)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from the newest complete checkpoint if there is one, else start (requeued jobs)",
    )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by launchers without --no_local_rank
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    args = parser.parse_intermixed_args(argv)  # key=value after --auto-resume too, as launchers and users append them
    try:
        config = load_run_config(args.config, args.overrides)  # the rest is checked by resolve_run, before any process group
        # Whether to resume is a filesystem question: rank 0 answers it for every rank, once the group exists.
        summary = run_training(config, resume="auto" if args.auto_resume else args.resume)
    except ValueError as err:
        print(f"train: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Stopped as stop:
        _say(f"train: {stop}; rerun with --resume (or --auto-resume) to continue")
        return stop.exit_code
    except GuardStopped as stop:
        _say(f"train: {stop}")
        if stop.rolled_back_to is not None and config.train.export:
            _say(f"exported {stop.rolled_back_to.name} to {config.output_dir}/final")
        return stop.exit_code
    except NonFiniteLoss as err:
        _say(f"train: error: {err}")
        return 1
    if "export" in summary:
        print(f"exported {summary['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
