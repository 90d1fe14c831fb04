"""Training entry point: `deepspeed launch/train.py --config RUN.yaml [key.sub=value ...] [--resume]`."""

import os
import sys

from adept_ds.runtime.distributed import threads_per_rank, usable_cpus
from adept_ds.train import main

if __name__ == "__main__":
    if os.environ.get("LOCAL_RANK") == "0":  # once per node: what a Slurm step or container lets the ranks use
        print(f"cpus: {usable_cpus()} usable (affinity), {threads_per_rank()} threads per rank unless train.threads is set", flush=True)
    sys.exit(main())
