"""Attaching weight masks to a model: buffers, gradient hooks, re-application, removal, reports, save and load.

A mask is a boolean tensor shaped like the weight of one prunable layer (`nn.Linear` or a convolution; True = kept).
It lives on the module as the non-persistent buffer `weight_mask`, so it follows `model.to(...)`, never enters
`state_dict()` and `save_pretrained` writes a plain dense-format model whose pruned weights are zeros. Unlike
`torch.nn.utils.prune` nothing is re-parameterised: `module.weight` stays the trained `nn.Parameter`.

Two mechanisms keep pruned weights at exactly zero during training:
* a gradient hook on each masked weight zeroes the gradient of pruned entries before it is accumulated, so
  momentum and Adam moments of pruned weights stay zero, under gradient accumulation and DDP alike;
* `reapply()` (call it after every optimizer step) zeroes them again, a guard against anything that writes
  weights outside autograd (EMA, weight loading, a custom optimizer).
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .config import DEFAULT_PRUNABLE_PATTERNS, MASK_BUFFER_NAME, normalize_patterns
from .serialization import mask_sparsity, read_masks, resolve_mask_path, write_mask_file


PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layer types that carry weight masks."""

MaskDict = dict[str, torch.Tensor]

# Parameter -> handle of its gradient-masking hook. Keyed weakly by the parameter's identity (not stored on the
# module) so a deep copy of the model never shares, nor removes, the original's hooks: `Parameter.__deepcopy__`
# drops hooks and `reapply` re-installs them on the copy.
_GRAD_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def model_family(model: nn.Module) -> str:
    """"vit" when the model has ViT block projections (SparseViT, HF ViT), else "cnn"."""
    vit = re.compile(DEFAULT_PRUNABLE_PATTERNS[0])
    return "vit" if any(isinstance(m, nn.Linear) and vit.search(n) for n, m in model.named_modules()) else "cnn"


def _default_prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """ViT block projections when the model has them; otherwise every convolution but the first (the stem) and every
    Linear but the last (the classifier), in module order."""
    vit = re.compile(DEFAULT_PRUNABLE_PATTERNS[0])
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)]
    found = {name: module for name, module in layers if isinstance(module, nn.Linear) and vit.search(name)}
    if found:
        return found
    convolutions = [name for name, module in layers if not isinstance(module, nn.Linear)]
    linears = [name for name, module in layers if isinstance(module, nn.Linear)]
    keep = set(convolutions[1:]) | set(linears[:-1])
    return {name: module for name, module in layers if name in keep}


def find_prunable_layers(
    model: nn.Module, patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS
) -> dict[str, nn.Module]:
    """The `nn.Linear` and convolution modules whose names match one of `patterns` (`re.search`), in module order.

    With `DEFAULT_PRUNABLE_PATTERNS`: the ViT block projections or, on a model without them (a CNN), every
    convolution after the stem and every Linear before the classifier (see `DEFAULT_PRUNABLE_PATTERNS`).
    """
    patterns = normalize_patterns(patterns)
    if patterns == DEFAULT_PRUNABLE_PATTERNS:
        found = _default_prunable_layers(model)
    else:
        compiled = [re.compile(pattern) for pattern in patterns]
        found = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, PRUNABLE_TYPES) and any(regex.search(name) for regex in compiled)
        }
    if not found:
        raise ValueError(
            f"No nn.Linear or convolution module of {type(model).__name__} matches the prunable patterns "
            f"{list(patterns)}; pass `patterns=` with regexes matching your module names."
        )
    return found


find_prunable_linears = find_prunable_layers  # the name before convolutions were prunable


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` that carry a `weight_mask` buffer."""
    return {name: module for name, module in model.named_modules() if MASK_BUFFER_NAME in module._buffers}


def get_masks(model: nn.Module) -> MaskDict:
    """The masks attached to `model`, keyed by module name (the buffers themselves, not copies)."""
    return {name: module._buffers[MASK_BUFFER_NAME] for name, module in masked_modules(model).items()}


def _as_bool_mask(name: str, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"The mask of `{name}` must be a tensor, got {type(mask).__name__}.")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"The mask of `{name}` has shape {tuple(mask.shape)} but its weight has shape {tuple(weight.shape)}."
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"The mask of `{name}` must hold only 0 and 1 (or be boolean).")
        mask = mask != 0
    return mask.to(device=weight.device)


def _mask_grad_hook(module: nn.Module) -> Any:
    module_ref = weakref.ref(module)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        owner = module_ref()
        mask = None if owner is None else owner._buffers.get(MASK_BUFFER_NAME)
        if mask is None:
            return grad
        # masked_fill rather than a product: a NaN/inf gradient of a pruned weight must not leak through 0 * x.
        return grad.masked_fill(~mask, 0)

    return hook


def _ensure_grad_hook(module: nn.Module) -> None:
    weight = module.weight
    if weight.requires_grad and weight not in _GRAD_HOOKS:
        _GRAD_HOOKS[weight] = weight.register_hook(_mask_grad_hook(module))


def _remove_grad_hook(module: nn.Module) -> None:
    handle = _GRAD_HOOKS.pop(module.weight, None)
    if handle is not None:
        handle.remove()


def apply_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> WeightMasks:
    """Attach `masks` (module name -> 0/1 or boolean tensor shaped like the weight) and zero the pruned weights.

    Masks already on other modules stay; a module named here gets its mask replaced. Returns a `WeightMasks`
    handle (the same state can be reached through the module-level functions).
    """
    if not masks:
        raise ValueError("`masks` is empty: nothing to apply.")
    modules = dict(model.named_modules())
    unknown = [name for name in masks if name not in modules]
    if unknown:
        hint = " (keys are module names, e.g. 'mlp.fc1', not parameter names)" if any(
            name.endswith(".weight") for name in unknown
        ) else ""
        raise ValueError(f"`masks` names modules that {type(model).__name__} lacks: {unknown[:5]}{hint}.")
    for name, mask in masks.items():
        module = modules[name]
        if not isinstance(module, PRUNABLE_TYPES):
            raise ValueError(
                f"`masks` names `{name}`, a {type(module).__name__}; only nn.Linear and convolution modules are masked."
            )
        mask = _as_bool_mask(name, mask, module.weight)
        if MASK_BUFFER_NAME in module._buffers:
            module._buffers[MASK_BUFFER_NAME] = mask
        elif hasattr(module, MASK_BUFFER_NAME):
            raise ValueError(
                f"`{name}` already has an attribute `{MASK_BUFFER_NAME}` (torch.nn.utils.prune?); "
                "remove that pruning first."
            )
        else:
            module.register_buffer(MASK_BUFFER_NAME, mask, persistent=False)
        with torch.no_grad():
            module.weight.masked_fill_(~mask, 0)
        _ensure_grad_hook(module)
    return WeightMasks(model, metadata)


@torch.no_grad()
def reapply(model: nn.Module) -> None:
    """Zero the pruned weights again (call after every optimizer step) and re-install missing gradient hooks."""
    for module in masked_modules(model).values():
        module.weight.masked_fill_(~module._buffers[MASK_BUFFER_NAME], 0)
        _ensure_grad_hook(module)


def remove_masks(model: nn.Module) -> MaskDict:
    """Detach all masks (buffers and gradient hooks); the weights keep their zeros. Returns the removed masks."""
    removed = {}
    for name, module in masked_modules(model).items():
        _remove_grad_hook(module)
        removed[name] = module._buffers.pop(MASK_BUFFER_NAME)
    return removed


def sparsity_report(model: nn.Module, patterns: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Measured sparsity (fraction of weights that are exactly zero).

    The layers reported are the masked ones, or, on a model without masks, the Linears matching `patterns`
    (default `DEFAULT_PRUNABLE_PATTERNS`). Returns `layers` (name -> sparsity of its weight), `prunable_sparsity`,
    `prunable_params`, `prunable_zeros`, and `total_sparsity`, `total_params`, `total_zeros` over all parameters
    (shared parameters counted once).
    """
    modules = masked_modules(model) if patterns is None else {}
    if not modules:
        modules = find_prunable_layers(model, patterns if patterns is not None else DEFAULT_PRUNABLE_PATTERNS)
    layers: dict[str, float] = {}
    prunable_zeros = prunable_params = 0
    for name, module in modules.items():
        zeros = int((module.weight == 0).sum())
        layers[name] = zeros / module.weight.numel()
        prunable_zeros += zeros
        prunable_params += module.weight.numel()
    total_zeros = total_params = 0
    for parameter in model.parameters():  # `parameters()` already yields each shared parameter once
        total_zeros += int((parameter == 0).sum())
        total_params += parameter.numel()
    return {
        "layers": layers,
        "prunable_sparsity": prunable_zeros / max(prunable_params, 1),
        "prunable_params": prunable_params,
        "prunable_zeros": prunable_zeros,
        "total_sparsity": total_zeros / max(total_params, 1),
        "total_params": total_params,
        "total_zeros": total_zeros,
    }


class WeightMasks:
    """Handle on the masks attached to a model (returned by `apply_masks`, `load_masks` and `prune_model`).

    It holds no mask copy: the buffers on the modules are the truth, so the handle and the module-level functions
    can be mixed freely. `metadata` (method, target sparsity, patterns ...) is written by `save`.
    """

    def __init__(self, model: nn.Module, metadata: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def masks(self) -> MaskDict:
        return get_masks(self.model)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned entries over all masks."""
        return mask_sparsity(self.masks)

    def reapply(self) -> None:
        reapply(self.model)

    def remove(self) -> MaskDict:
        return remove_masks(self.model)

    def report(self) -> dict[str, Any]:
        return sparsity_report(self.model)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `sparsity_masks.safetensors` (into `path` if it is a directory) with this handle's metadata."""
        return save_masks(self.model, path, metadata=self.metadata)

    def __repr__(self) -> str:
        masks = self.masks
        return f"WeightMasks(layers={len(masks)}, sparsity={mask_sparsity(masks):.4f}, metadata={self.metadata})"


def save_masks(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write the masks attached to `model` to a safetensors file and return its path (see `write_mask_file`)."""
    masks = get_masks(model)
    if not masks:
        raise ValueError(f"{type(model).__name__} carries no weight masks to save (see `apply_masks`).")
    return write_mask_file(masks, path, metadata)


def load_masks(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> WeightMasks:
    """Load a mask file into `model` (attaching buffers, zeroing pruned weights) and return the handle.

    Every name must be a prunable layer of `model` with the same weight shape. With `strict` and `patterns` in the
    file's metadata, the layers of `model` matching those patterns must be exactly the file's names (a mask file
    from a deeper or differently named model fails instead of leaving layers dense).
    """
    masks, metadata = read_masks(path)
    path = resolve_mask_path(path)
    if not masks:
        raise ValueError(f"Mask file {path} holds no mask.")
    modules = dict(model.named_modules())
    missing = [name for name in masks if not isinstance(modules.get(name), PRUNABLE_TYPES)]
    if missing:
        raise ValueError(
            f"Mask file {path} names modules that are not nn.Linear or convolution modules of the model: {missing[:5]}."
        )
    wrong = [
        f"{name}: file {tuple(mask.shape)} vs model {tuple(modules[name].weight.shape)}"
        for name, mask in masks.items()
        if tuple(mask.shape) != tuple(modules[name].weight.shape)
    ]
    if wrong:
        raise ValueError(f"Mask file {path} does not fit the model; shape mismatch for {wrong[:5]}.")
    if strict and metadata.get("patterns"):
        expected = set(find_prunable_layers(model, normalize_patterns(metadata["patterns"])))
        if expected != set(masks):
            raise ValueError(
                f"Mask file {path} covers {len(masks)} modules but the model has {len(expected)} matching its "
                f"patterns; unmasked: {sorted(expected - set(masks))[:5]}, extra: {sorted(set(masks) - expected)[:5]}."
            )
    return apply_masks(model, masks, metadata=metadata)
