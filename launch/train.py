"""Training entry point: `deepspeed launch/train.py --config RUN.yaml [key.sub=value ...] [--resume]`."""

import sys

from adept_ds.train import main

if __name__ == "__main__":
    sys.exit(main())
