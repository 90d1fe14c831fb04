import pytest
import torch
from tiny_models import CONFIG_CLASSES, tiny_config
from transformers import AutoModelForCausalLM

from adept_ds.model.families import FAMILIES, get_family


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'.*llama, mistral, qwen2, qwen3"):
        get_family("gpt2")
    with pytest.raises(ValueError, match="unsupported model family 'None'"):
        get_family(None)


def test_every_family_with_a_tiny_model_is_supported():
    assert set(CONFIG_CLASSES) == set(FAMILIES)


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_adapter_matches_the_real_transformers_layout(family_name):
    """Every tensor of every decoder layer of the real HF model belongs to exactly one declared unit, and
    every declared unit exists: catches drift between the adapter and transformers' module names."""
    family = get_family(family_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(family_name, num_layers=2, attention_bias=True))
    units_seen = set()
    for name, _ in model.named_parameters():
        split = family.split_layer_key(name)
        if split is None:
            assert not name.startswith(family.layers_prefix)
            continue
        layer, local = split
        assert layer in (0, 1)
        units_seen.add(family.unit_of(local))
    assert units_seen == set(family.units)
    residual = {unit for unit in family.units if unit in family.residual_outputs}
    assert residual == {"self_attn.o_proj", "mlp.down_proj"}


def test_qwen3_has_qk_norm_units_and_llama_does_not():
    assert {"self_attn.q_norm", "self_attn.k_norm"} <= set(get_family("qwen3").units)
    assert "self_attn.q_norm" not in get_family("llama").units


def test_unknown_layer_tensor_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="belongs to none of the known units"):
        get_family("llama").unit_of("self_attn.rotary_emb.inv_freq")


def test_split_layer_key():
    family = get_family("llama")
    assert family.split_layer_key("model.layers.12.mlp.up_proj.weight") == (12, "mlp.up_proj.weight")
    assert family.split_layer_key("model.embed_tokens.weight") is None
    assert family.split_layer_key("lm_head.weight") is None
