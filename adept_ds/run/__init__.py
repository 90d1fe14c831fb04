"""What a run is, settled before any process starts: the run config, the DeepSpeed config, the memory plan and
layout, and `resolve.resolve_run`, which turns them into the one `ResolvedRun` that check, plan and train read."""
