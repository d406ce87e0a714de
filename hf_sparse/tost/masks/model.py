"""Attaching weight masks to a model: buffers, gradient hooks, re-application, removal, reports, save and load.

A mask is a boolean tensor shaped like the weight of one prunable layer (`nn.Linear` or a convolution; True = kept).
It lives on the module as the non-persistent buffer `weight_mask`, so it follows `model.to(...)`, never enters
`state_dict()` and `save_pretrained` writes a plain dense-format model whose pruned weights are zeros. Unlike
`torch.nn.utils.prune` nothing is re-parameterised: `module.weight` stays the trained `nn.Parameter`.

Two mechanisms keep pruned weights at exactly zero during training:
* a post-accumulate-grad hook on each masked weight zeroes, in place, the gradient of pruned entries as soon as it is
  accumulated (before DDP buckets it or an optimizer reads it), so momentum and Adam moments of pruned weights stay
  zero, under gradient accumulation and DDP alike; `masked_fill_` rather than a product, so a NaN/inf gradient of a
  pruned weight never leaks;
* `reapply()` (call it after every optimizer step) multiplies all masked weights by their masks with one fused
  `torch._foreach_mul_`, a guard against anything that writes finite values into weights outside autograd (decoupled
  weight decay, EMA, a custom optimizer): those become exact zeros. A product cannot clear a NaN/inf written into a
  pruned entry outside autograd (NaN * 0 is NaN); the gradient hook already keeps non-finite gradients out, so only
  such a direct write can leave one.

Where exact zeros must hold whatever was written, the masks are applied with `masked_fill_` instead: by `apply_masks`
(and so `load_masks`), by `reapply(model, exact=True)` (one fill per masked weight, from the same cache), and by
`save_masks`; `ToSTTrainer.save_model` calls `reapply(model, exact=True)` before writing the weights.

Both work from a per-model cache of (weight, mask) pairs, rebuilt when a parameter, a mask buffer or a mask's content
changes, so no step walks the modules. Under FSDP2 (`torch.distributed.fsdp.fully_shard`) the weights become DTensors:
the cache then holds each mask's local shard (sharded like its weight), the hooks sit on the sharded parameters (FSDP2
calls them after the reduce-scatter) and the products run on the local shards; the `weight_mask` buffers stay whole,
so `save_masks` writes and `load_masks` reads whole masks. Call `reapply(model)` once after `fully_shard` (the
`ToSTTrainer` does so when training begins) to move the hooks onto the sharded parameters. FSDP1
(`FullyShardedDataParallel`) flattens the weights and is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.weak import WeakIdKeyDictionary

from .config import DEFAULT_PRUNABLE_PATTERNS, MASK_BUFFER_NAME, normalize_patterns
from .serialization import mask_sparsity, read_masks, resolve_mask_path, write_mask_file


PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layer types that carry weight masks."""

MaskDict = dict[str, torch.Tensor]

# Parameter -> (handle of its gradient-masking hook, [local pruned mask]). Keyed weakly by the parameter's identity
# (not stored on the module) so a deep copy of the model never shares, nor removes, the original's hooks:
# `Parameter.__deepcopy__` drops hooks and `reapply` re-installs them on the copy. The one-element list lets a new
# mask reach an installed hook without re-registering it.
_GRAD_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()

# Bumped by `apply_masks` / `remove_masks` (on any model): every cache of masked weights is then rebuilt once.
_MASKS_GENERATION = [0]
_CACHE_ATTRIBUTE = "_hf_sparse_masked_weights"


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
            f"{list(patterns)}; pass regexes matching your module names (`mask_patterns` of ToSTTrainingArguments, "
            "`patterns` of MaskConfig and of the mask functions)."
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


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _refuse_fsdp1(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "Weight masks do not support FSDP1 (`FullyShardedDataParallel`): it flattens the weights, so the masks "
            "cannot follow them. Use FSDP2 (`fully_shard`, or `fsdp_version: 2` in accelerate's config) or DDP."
        )


def _local_mask(name: str, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The part of the whole boolean `mask` that matches the local values of `weight`: the mask itself for a plain
    weight, the shard with the weight's mesh and placements for a DTensor (FSDP2) weight."""
    local_weight = _local(weight)
    if isinstance(weight, DTensor):
        # src_data_rank=None: every rank holds the whole mask already, so each keeps its own chunk, no communication.
        mask = distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None).to_local()
    mask = mask.to(local_weight.device)
    if mask.shape != local_weight.shape:
        raise ValueError(
            f"The mask of `{name}` does not fit the local values of its weight ({tuple(mask.shape)} vs "
            f"{tuple(local_weight.shape)}): the weight was flattened or resharded (FSDP1?). Masks support plain "
            "weights and FSDP2 DTensor weights."
        )
    return mask


def _mask_grad_hook(pruned: list[torch.Tensor]) -> Any:
    @torch.no_grad()
    def hook(parameter: torch.Tensor) -> None:
        grad = parameter.grad
        if grad is not None:
            # In place, after accumulation, on the local shard under FSDP2; masked_fill_ rather than a product: a
            # NaN/inf gradient of a pruned weight must not leak through 0 * x.
            _local(grad).masked_fill_(pruned[0], 0)

    return hook


def _ensure_grad_hook(weight: nn.Parameter, pruned: torch.Tensor) -> None:
    if not weight.requires_grad:
        return
    if weight in _GRAD_HOOKS:
        _GRAD_HOOKS[weight][1][0] = pruned
    else:
        holder = [pruned]
        _GRAD_HOOKS[weight] = (weight.register_post_accumulate_grad_hook(_mask_grad_hook(holder)), holder)


def _remove_grad_hook(weight: torch.Tensor) -> None:
    entry = _GRAD_HOOKS.pop(weight, None)
    if entry is not None:
        entry[0].remove()


@dataclass
class _MaskedWeight:
    """One masked weight as cached for the per-step passes: what it was built from (to notice a change) and the
    local pruned mask (gradients, `masked_fill_`) and kept mask in the weight's dtype (weights, `_foreach_mul_`)."""

    module: nn.Module
    weight: nn.Parameter
    mask: torch.Tensor
    mask_version: int
    pruned: torch.Tensor
    keep: torch.Tensor

    def is_current(self) -> bool:
        weight = self.module._parameters.get("weight")
        local = _local(weight) if weight is not None else None
        return (
            weight is self.weight
            and self.module._buffers.get(MASK_BUFFER_NAME) is self.mask
            and self.mask._version == self.mask_version
            and local.dtype == self.keep.dtype
            and local.device == self.keep.device
        )


class _MaskedWeightCache:
    """Lives in the model's `__dict__`; a deep copy or a pickle of the model starts without it (new parameters)."""

    def __init__(self, generation: int = -1, entries: list[_MaskedWeight] | None = None) -> None:
        self.generation = generation
        self.entries = entries or []

    def __deepcopy__(self, memo: dict) -> _MaskedWeightCache:
        return _MaskedWeightCache()

    def __reduce__(self) -> tuple:
        return (_MaskedWeightCache, ())


def _build_masked_weights(model: nn.Module) -> list[_MaskedWeight]:
    _refuse_fsdp1(model)
    entries = []
    for name, module in model.named_modules():
        mask = module._buffers.get(MASK_BUFFER_NAME)
        if mask is None:
            continue
        weight = module.weight
        local_mask = _local_mask(name, mask, weight)
        pruned = ~local_mask
        entries.append(_MaskedWeight(module, weight, mask, mask._version, pruned, local_mask.to(_local(weight).dtype)))
        _ensure_grad_hook(weight, pruned)
        if weight.grad is not None:  # a gradient accumulated before this (new) mask or (new) parameter was known
            with torch.no_grad():
                _local(weight.grad).masked_fill_(pruned, 0)
    return entries


def _masked_weights(model: nn.Module) -> list[_MaskedWeight]:
    """The cached (weight, mask) pairs of `model`, rebuilt (one module walk) only when something changed: masks
    applied or removed anywhere, a parameter replaced (`fully_shard`, `to_empty`), a mask moved or edited in place."""
    cache = model.__dict__.get(_CACHE_ATTRIBUTE)
    generation = _MASKS_GENERATION[0]
    if cache is None or cache.generation != generation or not all(entry.is_current() for entry in cache.entries):
        cache = _MaskedWeightCache(generation, _build_masked_weights(model))
        model.__dict__[_CACHE_ATTRIBUTE] = cache
    return cache.entries


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
        if isinstance(mask, DTensor):
            mask = mask.full_tensor()  # the buffer holds the whole mask; the local shard is cached
        if MASK_BUFFER_NAME in module._buffers:
            module._buffers[MASK_BUFFER_NAME] = mask
        elif hasattr(module, MASK_BUFFER_NAME):
            raise ValueError(
                f"`{name}` already has an attribute `{MASK_BUFFER_NAME}` (torch.nn.utils.prune?); "
                "remove that pruning first."
            )
        else:
            module.register_buffer(MASK_BUFFER_NAME, mask, persistent=False)
    _MASKS_GENERATION[0] += 1
    reapply(model, exact=True)
    return WeightMasks(model, metadata)


@torch.no_grad()
def reapply(model: nn.Module, exact: bool = False) -> None:
    """Zero the pruned weights again (call after every optimizer step; once after `fully_shard`).

    Per step (`exact=False`): one fused `torch._foreach_mul_` of the local values of all masked weights by their kept
    masks, from a cache of the (weight, mask) pairs. Finite values written into pruned entries become exact zeros; a
    NaN/inf written there outside autograd stays (NaN * 0 is NaN). `exact=True`: one `masked_fill_` per masked
    weight, exact zeros whatever the pruned entries hold (before saving; `ToSTTrainer.save_model` uses it).

    Either way the gradient hooks are (re)installed when the cache is rebuilt (new masks, new or sharded parameters).
    """
    entries = _masked_weights(model)
    if not entries:
        return
    if exact:
        for entry in entries:
            _local(entry.weight).masked_fill_(entry.pruned, 0)
    else:
        torch._foreach_mul_([_local(entry.weight) for entry in entries], [entry.keep for entry in entries])


def masked_weight_sparsity(model: nn.Module) -> float | None:
    """Fraction of the masked weights that are exactly zero (whole weights, also under FSDP2), with one host sync;
    None on a model without masks.

    Under FSDP2 the zeros of the sharded (DTensor) weights are summed over their sharded mesh dimensions (one
    all-reduce per mesh and placement, usually one in all) and added to those of the unsharded weights, which every
    rank holds whole: call it on every rank.
    """
    entries = _masked_weights(model)
    if not entries:
        return None
    device = _local(entries[0].weight).device
    distributed = dist.is_available() and dist.is_initialized()
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    # (mesh, placements) -> (a weight sharded so, the local zeros of all weights sharded so)
    sharded: dict[tuple[int, tuple], tuple[DTensor, torch.Tensor]] = {}
    for entry in entries:
        local_zeros = (_local(entry.weight) == 0).sum().to(device)
        weight = entry.weight
        if distributed and isinstance(weight, DTensor):
            key = (id(weight.device_mesh), tuple(weight.placements))
            first, total = sharded.get(key, (weight, torch.zeros_like(zeros)))
            sharded[key] = (first, total + local_zeros)
        else:
            zeros += local_zeros
    for weight, sharded_zeros in sharded.values():
        for dim, placement in enumerate(weight.placements):
            if isinstance(placement, Shard):
                dist.all_reduce(sharded_zeros, group=weight.device_mesh.get_group(dim))
        zeros += sharded_zeros
    return zeros.item() / sum(entry.weight.numel() for entry in entries)


def remove_masks(model: nn.Module) -> MaskDict:
    """Detach all masks (buffers and gradient hooks); the weights keep their zeros. Returns the removed masks."""
    removed = {}
    for name, module in masked_modules(model).items():
        _remove_grad_hook(module.weight)
        removed[name] = module._buffers.pop(MASK_BUFFER_NAME)
    _MASKS_GENERATION[0] += 1
    model.__dict__.pop(_CACHE_ATTRIBUTE, None)
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

    def reapply(self, exact: bool = False) -> None:
        reapply(self.model, exact=exact)

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
    """Write the masks attached to `model` to a safetensors file and return its path (see `write_mask_file`).

    The pruned weights are first set to exact zeros (`reapply(model, exact=True)`), so weights saved beside the
    masks agree with them even after a non-finite write outside autograd."""
    masks = get_masks(model)
    if not masks:
        raise ValueError(f"{type(model).__name__} carries no weight masks to save (see `apply_masks`).")
    reapply(model, exact=True)
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
