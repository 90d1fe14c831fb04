"""Corpora into token stores, and which blocks a step reads: raw corpus readers, the memory-mapped token store,
the O(1) sampler and mixtures, and the demo's generated domain."""
