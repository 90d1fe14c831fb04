"""The FLOP-count limit of an ADEPT step relative to a full-training step of the original model.

Per token, a decoder layer's forward costs 2 x (its projection weights) for the matmuls plus
4 x seq x hidden for attention scores and their weighted sum; the LM head costs 2 x hidden x vocab.
Backward splits into activation gradients (as much again as the forward, attention core twice)
and weight gradients (as much again as the forward matmuls, trainable tensors only).

- full training (pt_full, original L layers): forward + activation grads + weight grads everywhere.
- ADEPT (expanded model): forward through everything; activation gradients only from the loss
  down to the lowest trainable layer (below it nothing needs a gradient); weight gradients only
  for the trainable layers (the copies). Norm and embedding costs are negligible and left out.
"""

from __future__ import annotations


def layer_costs(config: dict, seq_len: int) -> tuple[float, float, float]:
    """Per-token (projection matmul FLOPs, attention-core FLOPs, LM-head FLOPs) of one forward."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention_weights = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp_weights = 3 * hidden * inter  # gate, up, down
    projections = 2.0 * (attention_weights + mlp_weights)
    attention_core = 4.0 * seq_len * heads * head_dim
    lm_head = 2.0 * hidden * config["vocab_size"]
    return projections, attention_core, lm_head


def full_step_flops(config: dict, seq_len: int) -> float:
    projections, core, head = layer_costs(config, seq_len)
    layers = config["num_hidden_layers"]
    return layers * (3 * projections + 3 * core) + 3 * head


def partial_step_flops(config: dict, seq_len: int, num_layers: int, trainable: list[int]) -> float:
    """A model of `num_layers` layers where only the layers `trainable` (0-based) have weight gradients."""
    projections, core, head = layer_costs(config, seq_len)
    lowest = min(trainable)
    forward = num_layers * (projections + core) + head
    activation_grads = head + (num_layers - lowest) * (projections + 2 * core)
    weight_grads = len(trainable) * projections
    return forward + activation_grads + weight_grads


def adept_limit(config: dict, seq_len: int, copied_layers: list[int], expanded_layers: int) -> float:
    """FLOP ratio of an ADEPT step (expanded model, copies train) to a full step of the original model."""
    return partial_step_flops(config, seq_len, expanded_layers, copied_layers) / full_step_flops(config, seq_len)
