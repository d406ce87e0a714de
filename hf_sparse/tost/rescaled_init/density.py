"""Closed-form layer-wise rescaling of a sparse initialisation."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..masks.model import get_masks


@torch.no_grad()
def density_rescale(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Multiply each masked weight by 1 / sqrt(density) of its mask (the masks on the model by default).

    A layer keeping a fraction d of its inputs has its output variance scaled by d at initialisation; the factor
    restores it. Pruned entries are (re-)zeroed; a fully pruned layer is left as is. Returns name -> factor.
    """
    masks = get_masks(model) if masks is None else masks
    if not masks:
        raise ValueError("No masks: pass `masks` or attach them to the model first (see `apply_masks`).")
    modules = dict(model.named_modules())
    factors = {}
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"`masks` names `{name}`, which is not a module with a weight in the model.")
        mask = mask.to(module.weight.device, torch.bool)
        density = mask.float().mean().item()
        factor = 1.0 / math.sqrt(density) if density > 0 else 1.0
        module.weight.mul_(factor).masked_fill_(~mask, 0)
        factors[name] = factor
    return factors
