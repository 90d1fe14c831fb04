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
    package_data={"adept_ds": ["assets/*.jsonl", "assets/*.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3"]},
    entry_points={"console_scripts": ["adept-ds=adept_ds.cli:main"]},
)
