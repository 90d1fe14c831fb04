"""Training entry point: `deepspeed launch/train.py --config RUN.yaml [key.sub=value ...] [--resume]`.

Parses, builds, trains, cleans up: everything else lives in adept_ds.
"""

import argparse
import sys

from adept_ds.config import load_run_config
from adept_ds.engine import run_training


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (launch/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by older launchers
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
