"""Export streams: its peak memory is one base shard plus the trained tensors, measured in a subprocess.

A ~240 MB bf16 model in 4 shards is expanded by one layer, trained one step (one real DeepSpeed
ZeRO-3 process) and exported in a fresh process. Once the imports are done, that process resets its
peak RSS (Linux: writing 5 to /proc/self/clear_refs resets VmHWM); the peak during the export must
stay under the bound: the RSS after the imports, plus the largest base shard, plus the trained tensors
in fp32 (the optimizer files' pages it reads), plus the one trained tensor being assembled (its fp32
gather and its cast: 1.5x the largest trained tensor in fp32), plus 16 MiB.
"""

import json
import subprocess
import sys

from distributed import cpu_env
from tiny_models import make_tiny_model
from train_setup import REPO
from transformers import AutoModelForCausalLM

from adept_ds.model.checkpoint import open_checkpoint
from adept_ds.model.expand import expand_checkpoint, read_manifest

IMPORTS = "import re, torch, safetensors.torch, deepspeed.utils.zero_to_fp32, adept_ds.training.export, adept_ds.model.merge"
MEASURE = """
def status(key):
    return 1024 * int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := RSS now
start = status("VmRSS")
{work}
print("RSS", start, status("VmHWM"))
"""


def _rss_during(work: str, **env: str) -> tuple[int, int]:
    """(RSS after the imports, peak RSS while `work` ran) of a fresh process, with `env` added to its environment."""
    code = IMPORTS + MEASURE.format(work=work)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_env(**env), check=True)
    start, peak = result.stdout.split("RSS")[-1].split()
    return int(start), int(peak)


def test_export_peak_memory_is_one_shard_plus_the_trained_tensors(tmp_path):
    original = make_tiny_model(
        tmp_path / "fp32",
        num_layers=4,
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    bf16 = tmp_path / "original"
    AutoModelForCausalLM.from_pretrained(original, dtype="bfloat16").save_pretrained(bf16, max_shard_size="80MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (original / name).exists():
            (bf16 / name).write_bytes((original / name).read_bytes())
    expanded = tmp_path / "expanded"
    expand_checkpoint(bf16, expanded, [1], show_progress=False)
    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": f"sentence {i} about numbers and words " * 4}) + "\n" for i in range(64)))
    run = tmp_path / "run"
    overrides = {
        "model": expanded,
        "method": "adept_no_stage2",
        "deepspeed": REPO / "ds_configs" / "zero3.json",
        "output_dir": run,
        "data.domain": domain,
        "data.block_size": 16,
        "data.cache_dir": tmp_path / "blocks",
        "train.max_steps": 1,
        "train.micro_batch_size": 1,
        "train.export": False,
        "scheduler.warmup_steps": 1,
    }
    command = [sys.executable, "-m", "adept_ds.train", *[f"{key}={value}" for key, value in overrides.items()]]
    subprocess.run(command, env=cpu_env(), check=True, capture_output=True, timeout=600)

    checkpoint = open_checkpoint(expanded)
    largest_shard = max((expanded / shard).stat().st_size for shard in checkpoint.shard_tensors)
    copy = f"model.layers.{read_manifest(expanded)['copied_layers'][0]}."
    from model_checks import load_state

    trained_numels = [t.numel() for name, t in load_state(expanded).items() if name.startswith(copy)]
    trained_fp32, assembling = 4 * sum(trained_numels), 1.5 * 4 * max(trained_numels)
    export = f"adept_ds.training.export.export_checkpoint('{run}/checkpoints', None, '{expanded}', '{tmp_path}/out', show_progress=False)"
    start, peak = _rss_during(export)
    bound = start + largest_shard + trained_fp32 + assembling + 16 * 2**20
    mib = 2**20
    model_bytes = sum((expanded / shard).stat().st_size for shard in checkpoint.shard_tensors)
    print(
        f"export peak RSS {peak / mib:.0f} MiB; bound {bound / mib:.0f} MiB = after imports {start / mib:.0f} + largest shard "
        f"{largest_shard / mib:.0f} + trained fp32 {trained_fp32 / mib:.0f} + assembling {assembling / mib:.0f} + 16; "
        f"the model is {model_bytes / mib:.0f} MiB"
    )
    assert peak <= bound
    assert len(checkpoint.shard_tensors) >= 3  # the bound is below the whole model's size only when sharded
    assert len(json.loads((tmp_path / "out" / "adept_export.json").read_text())["copied_shards"]) >= 1
