"""The floating-point operations of a training step as it runs, for every method (the compute half of the cost model).

Counted as `torch.utils.flop_counter.FlopCounterMode` counts them. Each matrix product of m x k by k x n is 2mkn
(the linears and the LM head). Scaled-dot-product attention is 4 T^2 heads head_dim per T-token sequence forward
(its two products over the whole T x T square, as the counter and the peers' 6N + 12 L H Q T formula count it,
though a causal kernel skips about half of them), and twice that backward. Elementwise work (norms,
activations, softmax, RoPE, the loss's exp) is not counted.

Per sample (one block of T tokens):
- forward: every layer's linears and attention, and the LM head over all T positions;
- backward, only from the lowest trainable layer up (nothing below it needs a gradient):
  - every linear's input gradient and attention's backward in those layers, and the head's input gradient;
  - the weight gradient of each trainable linear, and of the head when it trains (pt_full);
- recompute: with activation checkpointing, the forward of those same layers once more, less each layer's last
  product (the MLP's down projection), whose output nothing saves: torch's non-reentrant checkpoint stops early.

The chunked loss (model/lm_loss.py) computes the head's gradients inside its forward: the same products, moved.
A step is a global batch of such samples. Two passes come every so many steps and are amortised over them:
- the importance pass: forward and backward on `importance.batches` x `importance.batch_size` x ranks general
  samples, every `importance.interval` steps;
- validation: forward only, on each held-out set, every `eval.interval` steps.

`six_n` is the common 6 x parameters x tokens, for comparing with peers (torchtitan and PaLM add 12 L H Q T for
attention and leave out the embedding; none count recompute). It overstates a step whose backbone is frozen.

MFU is achieved FLOP/s per device over the device's dense peak in the run's precision: `GPU_PEAK_TFLOPS`, from
NVIDIA's datasheets (whose tensor-core figures are quoted with 2:4 sparsity: half of them is the dense peak), or
`train.peak_tflops`; on CPU a matmul is measured at start-up (training/engine.py) and the logs say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adept_ds.model.families import get_family
from adept_ds.run.plan import ModelShape

GPU_PEAK_TFLOPS = {
    # name in torch.cuda.get_device_name(): dense TFLOP/s for (bf16 and fp16, fp32 without TF32: PyTorch's default)
    "H100 PCIe": (756.5, 51.2),  # H100 datasheet, PCIe: BF16/FP16 tensor 1,513 with sparsity; FP32 51
    "H100": (989.4, 66.9),  # H100 datasheet, SXM5: BF16/FP16 tensor 1,979 with sparsity; FP32 67
    "H200": (989.4, 66.9),  # H200 datasheet, SXM: the H100 SXM's compute with 141 GB of HBM3e
    "A100": (312.0, 19.5),  # A100 datasheet: BF16/FP16 tensor 312 (624 with sparsity); FP32 19.5
    "L40S": (362.05, 91.6),  # L40S datasheet: BF16/FP16 tensor 733 with sparsity; FP32 91.6
    "A10": (125.0, 31.2),  # A10 datasheet: BF16/FP16 tensor 250 with sparsity; FP32 31.2
}
"""The first name found in the device's name wins, so the PCIe H100 is listed before the SXM one. The NVL boards
(H100 NVL, H200 NVL) run at other clocks and are left out: they need train.peak_tflops."""


def gpu_peak_tflops(device_name: str, half_precision: bool) -> float | None:
    """The datasheet's dense peak of a GPU by its name, in bf16/fp16 or fp32; None for a GPU not in the table."""
    if "NVL" in device_name:
        return None
    for name, (half, single) in GPU_PEAK_TFLOPS.items():
        if name in device_name:
            return half if half_precision else single
    return None


@dataclass(frozen=True)
class SampleFlops:
    """One T-token sample's operations, by what runs them."""

    forward: int
    backward_inputs: int
    """Activation gradients: the linears' input gradients, attention's backward, the head's input gradient."""
    backward_weights: int
    """Weight gradients of the trainable linears (and the head when it trains)."""
    recompute: int
    """Activation checkpointing's second forward of the layers backward runs through."""

    @property
    def train(self) -> int:
        return self.forward + self.backward_inputs + self.backward_weights + self.recompute


@dataclass(frozen=True)
class StepFlops:
    """One optimizer step of the whole job (every rank), by pass."""

    train: int
    importance: int
    """The importance pass, amortised per step."""
    validation: int
    """Validation, amortised per step."""
    six_n: int
    """6 x parameters x the step's trained tokens: the common count to compare MFU with peers at."""

    @property
    def total(self) -> int:
        return self.train + self.importance + self.validation


def matmul_weights(shape: ModelShape) -> dict[int | None, list[tuple[str, int]]]:
    """The weights that multiply activations, by decoder layer (None: outside the layers): every 2-D weight of a
    layer's projections (a norm's weight and a bias add elementwise)."""
    family = get_family(shape.config.get("model_type"))
    by_layer: dict[int | None, list[tuple[str, int]]] = {}
    for tensor in shape.tensors:
        if tensor.layer is None or not tensor.name.endswith(".weight"):
            continue
        local = tensor.name.split(".", 2)[2]  # layers.{i}.{local}
        if not family.unit_of(local).endswith("norm"):
            by_layer.setdefault(tensor.layer, []).append((tensor.name, tensor.numel))
    return by_layer


def sample_flops(shape: ModelShape, tokens: int, activation_checkpointing: bool = False, backward: bool = True) -> SampleFlops:
    """The operations of one `tokens`-long sample of the model `shape` describes, trained as it says."""
    config, family = shape.config, get_family(shape.config.get("model_type"))
    heads, vocab, hidden = config["num_attention_heads"], config["vocab_size"], shape.hidden
    attention = 4 * tokens * tokens * heads * shape.head_dim  # QK^T and PV over the full square
    linears = matmul_weights(shape)
    layer_forward = {layer: 2 * tokens * sum(numel for _, numel in weights) + attention for layer, weights in linears.items()}
    head = 2 * tokens * hidden * vocab
    forward = sum(layer_forward.values()) + head
    if not backward:
        return SampleFlops(forward, 0, 0, 0)
    trainable = set(shape.trainable_layers)
    lowest = shape.lowest_trainable_layer
    through = [layer for layer in layer_forward if layer >= lowest]
    inputs = sum(layer_forward[layer] - attention + 2 * attention for layer in through) + head
    weights = sum(2 * tokens * numel for layer in through if shape.trains_everything or layer in trainable for _, numel in linears[layer])
    weights += head if shape.trains_everything else 0
    # The layer's last product (the MLP's down projection) is not recomputed: its output is saved by no op, and
    # torch's non-reentrant checkpoint stops recomputing once every saved tensor is back.
    last = family.residual_outputs[-1] + ".weight"
    last_product = {layer: 2 * tokens * sum(numel for name, numel in weights if name.endswith(last)) for layer, weights in linears.items()}
    recompute = sum(layer_forward[layer] - last_product[layer] for layer in through) if activation_checkpointing else 0
    return SampleFlops(forward, inputs, weights, recompute)


def step_flops(
    shape: ModelShape,
    tokens: int,
    global_batch: int,
    activation_checkpointing: bool = False,
    importance_samples: int = 0,
    importance_interval: int = 0,
    validation_samples: int = 0,
    eval_interval: int = 0,
) -> StepFlops:
    """A step of `global_batch` samples, with `importance_samples` (all ranks) every `importance_interval` steps and
    `validation_samples` forwards (all ranks, all held-out sets) every `eval_interval` steps amortised over them."""
    sample = sample_flops(shape, tokens, activation_checkpointing)
    importance = math.ceil(importance_samples * sample.train / importance_interval) if importance_interval else 0
    validation = validation_samples * sample_flops(shape, tokens, backward=False).forward
    return StepFlops(
        train=global_batch * sample.train,
        importance=importance,
        validation=math.ceil(validation / eval_interval) if eval_interval else 0,
        six_n=6 * shape.numel * tokens * global_batch,
    )
