"""Hugging Face checkpoints and what ADEPT does to them: reading them without weights, the family adapters,
stage 1b's expansion, the trainable units, the chunked LM loss, and the offline demo model."""
