"""`deepspeed launch/train.py --config RUN.yaml [key.sub=value ...] [--resume]` (also `deepspeed --module adept_ds.train`).

Parses, validates (before any process group starts), trains, exports.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from adept_ds.config import load_run_config
    from adept_ds.engine import run_training

    parser = argparse.ArgumentParser(prog="train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (launch/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by launchers without --no_local_rank
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        config.validate_paths()
    except ValueError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    summary = run_training(config, resume=args.resume)
    if "export" in summary:
        print(f"exported {summary['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
