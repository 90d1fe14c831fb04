"""Which tensors train, and how they split into units (one optimizer param group per unit).

ADEPT trains only the manifest's copied layers; each copied layer splits into units, one per
projection and per norm (the family adapter lists them). Everything else is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adept_ds.model.families import Family


@dataclass(frozen=True)
class Unit:
    name: str
    """e.g. `layer13.self_attn.q_proj`: expanded-model layer index and module path."""
    param_names: tuple[str, ...]


def adept_units(model: nn.Module, family: Family, copied_layers: list[int]) -> list[Unit]:
    """One unit per (trainable layer, family unit); every parameter of such a layer lands in exactly one."""
    names = [name for name, _ in model.named_parameters()]
    units = []
    for layer in copied_layers:
        prefix = family.layer_prefix(layer)
        in_layer = [name for name in names if name.startswith(prefix)]
        if not in_layer:
            raise ValueError(
                f"copied layer {layer} from the manifest does not exist in the model ({len(family.decoder_layers(model))} layers)"
            )
        for unit in family.units:
            members = tuple(name for name in in_layer if family.unit_of(name[len(prefix) :]) == unit)
            if not members:
                raise ValueError(f"unit {unit} of layer {layer} has no parameters")
            units.append(Unit(name=f"layer{layer}.{unit}", param_names=members))
        assert sum(len(u.param_names) for u in units if u.name.startswith(f"layer{layer}.")) == len(in_layer)
    return units


def full_model_units(model: nn.Module) -> list[Unit]:
    """PT-Full: a single unit holding every parameter (uniform LR)."""
    return [Unit(name="all", param_names=tuple(name for name, _ in model.named_parameters()))]


def set_trainable(model: nn.Module, units: list[Unit]) -> None:
    """Freeze every parameter except those of `units`."""
    trainable = {name for unit in units for name in unit.param_names}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def build_param_groups(model: nn.Module, units: list[Unit], lr: float, weight_decay: float) -> list[dict]:
    """One named param group per unit. Norm weights get no weight decay (they scale, not project)."""
    params = dict(model.named_parameters())
    groups = []
    for unit in units:
        decay = 0.0 if unit.name.endswith("norm") else weight_decay
        groups.append({"params": [params[name] for name in unit.param_names], "name": unit.name, "lr": lr, "weight_decay": decay})
    return groups
