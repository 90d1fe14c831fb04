"""Model-family adapters: the one place that knows how each decoder family names its tensors.

Everything that edits or trains a model (expansion, units, probing) asks this module where the
decoder layers live, which modules form a layer's units, and which modules feed the residual
stream (zeroed in an identity copy so the copy adds nothing to the residual at initialisation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_LLAMA_UNITS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


@dataclass(frozen=True)
class Family:
    """How one decoder family lays out its tensors."""

    name: str
    """Family name as `config.json`'s `model_type` spells it."""
    units: tuple[str, ...]
    """Module paths inside one decoder layer, one per unit (projection or norm)."""
    layers_prefix: str = "model.layers"
    """State-dict prefix (and attribute path) of the decoder layer list."""
    decoder_path: str = "model"
    """Attribute path of the decoder stack (embeddings, layers, final norm) without the LM head."""
    final_norm_path: str = "model.norm"
    head_path: str = "lm_head"
    residual_outputs: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    """Modules whose output is added to the residual stream: zero in an identity copy."""
    per_layer_config_keys: tuple[str, ...] = ()
    """`config.json` fields that are lists with one entry per decoder layer."""

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def split_layer_key(self, key: str) -> tuple[int, str] | None:
        """`model.layers.3.mlp.up_proj.weight` -> (3, "mlp.up_proj.weight"); None for non-layer tensors."""
        match = re.fullmatch(re.escape(self.layers_prefix) + r"\.(\d+)\.(.+)", key)
        return (int(match.group(1)), match.group(2)) if match else None

    def unit_of(self, local_key: str) -> str:
        """The unit a layer-local tensor name (`mlp.up_proj.weight`) belongs to."""
        for unit in self.units:
            if local_key.startswith(unit + "."):
                return unit
        raise ValueError(
            f"tensor '{local_key}' of a {self.name} decoder layer belongs to none of the known units "
            f"{list(self.units)}; this checkpoint does not match the {self.name} layout adept_ds supports"
        )

    def is_residual_output(self, local_key: str) -> bool:
        return self.unit_of(local_key) in self.residual_outputs

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_prefix)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits from the residual stream after the last layer (final norm, then head)."""
        return model.get_submodule(self.head_path)(model.get_submodule(self.final_norm_path)(hidden))


def decoder_layer_numel(config: dict) -> int:
    """Parameters in one decoder layer, from `config.json` (every supported family has Llama's shape)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * 2 * (heads + (config.get("num_key_value_heads") or heads))  # q, o; k, v
    return attention + 3 * hidden * config["intermediate_size"] + 2 * hidden  # gate, up, down; two norms


def family_of(model: nn.Module) -> Family:
    return get_family(getattr(model.config, "model_type", None))


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(name="llama", units=_LLAMA_UNITS),
        Family(name="mistral", units=_LLAMA_UNITS),
        Family(name="qwen2", units=_LLAMA_UNITS, per_layer_config_keys=("layer_types",)),
        Family(
            name="qwen3",
            units=_LLAMA_UNITS + ("self_attn.q_norm", "self_attn.k_norm"),
            per_layer_config_keys=("layer_types",),
        ),
    )
}


def get_family(model_type: str | None) -> Family:
    """The adapter for a `model_type`; a clear error for any family we do not support."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model family '{model_type}' (config.json 'model_type'); adept_ds supports: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
