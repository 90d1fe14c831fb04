"""Under mpirun: hide Open MPI's rank variables and MASTER_*, then let adept_ds find ranks (mpi4py) and
the master (rank 0's choice, broadcast) and start the process group. argv: output_dir."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

for name in [n for n in os.environ if n.startswith("OMPI_COMM_WORLD_") or n.startswith("MASTER_")]:
    del os.environ[name]

from adept_ds.runtime.distributed import init_distributed, shutdown_distributed  # noqa: E402

rank, world_size = init_distributed()
total = torch.tensor([float(rank)])
dist.all_reduce(total)
names = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
result = {"rank": rank, "env": {n: os.environ[n] for n in names}, "used_mpi4py": "mpi4py.MPI" in sys.modules, "all_reduce": total.item()}
(Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(result))
shutdown_distributed()
