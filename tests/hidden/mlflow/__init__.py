"""Stands in for MLflow in the tests' rank processes (tests/distributed.cpu_env puts tests/hidden first on their path).

DeepSpeed's autotuner imports mlflow at import time when it is installed (deepspeed/autotuning/autotuner.py, in a
try/except ImportError): 1.3-2 s of every process that imports DeepSpeed, a few minutes over the suite's hundreds of
processes. adept_ds's own ranks avoid it (runtime.distributed.import_deepspeed); this covers the rest: DeepSpeed's
launcher and the tests' scripts that import deepspeed directly. No rank of the tests uses MLflow except those of
tests/test_report_sinks.py, which drop this directory from their path and get the real package."""

raise ImportError("mlflow is hidden from this test process (tests/hidden); see tests/hidden/mlflow/__init__.py")
