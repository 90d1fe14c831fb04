"""adept_ds: ADEPT continual pretraining (selective layer expansion + unit-wise adaptive LR) on DeepSpeed."""

__version__ = "0.1.0"
