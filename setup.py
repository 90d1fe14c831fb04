from setuptools import find_packages, setup

# Exact pins: the Docker image and CI install the same versions (torch==2.13.0 is also what keeps pip
# on the local CPU build here instead of pulling several GB of CUDA wheels).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "transformers==5.23.0",
    "datasets==5.2.0",
    "mpi4py>=4.0",
    "pyarrow>=15",
    "zstandard>=0.22",  # zstd-compressed corpora (corpus.py)
    "tensorboard>=2.15",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "matplotlib>=3.8",
    "gguf>=0.10",  # reads the offline demo model
    "accelerate>=1.0",
    "psutil>=5.9",  # which peer rank died (faults.py)
]

setup(
    name="adept_ds",
    version="0.1.0",
    description="ADEPT continual pretraining (selective layer expansion + unit-wise adaptive LR) on DeepSpeed ZeRO-3",
    packages=find_packages(include=["adept_ds", "adept_ds.*"]),
    # ds_configs/ is a link to the repository's ds_configs/: the DeepSpeed configs ship inside the package, by name.
    package_data={"adept_ds": ["assets/*.jsonl", "assets/*.md", "ds_configs/*.json"]},
    # the highest Requires-Python of the pins: transformers==5.23.0 (tests/test_docker_static.py checks it)
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # report.to sinks beyond TensorBoard (run_log.py)
        "wandb": ["wandb==0.31.0"],
        "mlflow": ["mlflow-skinny==3.18.0"],
        # the tests log to both for real (W&B offline, MLflow's file store)
        "test": ["pytest>=8", "pytest-timeout>=2.3", "wheel", "wandb==0.31.0", "mlflow-skinny==3.18.0"],
    },
    entry_points={"console_scripts": ["adept-ds=adept_ds.cli:main"]},
)
