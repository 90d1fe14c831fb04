"""Judging a trained model: perplexity and exact-match accuracy, the demo report, and multi-seed comparisons."""
