"""The processes a run lives in: process groups and ranks, signals and dead peers, shared-filesystem locks,
all-or-nothing output directories, and what a run logs. Imports nothing else of adept_ds."""
