"""What a run is, settled before anything loads: the run config, the DeepSpeed config, the memory plan and layout
(training/resolve.py puts them together with the model and the data into the `ResolvedRun`)."""
