"""One training step under torch.profiler, on every rank of a launched job; rank 0 prints the step's seconds and
its ops by self CPU time (benchmarks/RESULTS.md, issue 33: where a pt_full step's time goes on CPU).

    deepspeed --no_local_rank --num_gpus 2 benchmarks/profile_step.py key=value ...   (benchmarks/suite.py's run config)
"""

from __future__ import annotations

import sys
import time

from torch.profiler import ProfilerActivity, profile

from adept_ds.run.config import load_run_config
from adept_ds.training.engine import Trainer
from adept_ds.training.resolve import resolve_run


def main() -> None:
    trainer = Trainer(resolve_run(load_run_config(None, sys.argv[1:]), show_progress=False), show_progress=False)
    trainer.train_step()  # warm-up: ZeRO-3 records its gather trace in the first step
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        started = time.perf_counter()
        trainer.train_step()
        seconds = time.perf_counter() - started
    if trainer.rank == 0:
        print(f"step {seconds}")
        print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    trainer.close()


if __name__ == "__main__":
    main()
