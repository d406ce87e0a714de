"""Saving and loading weight masks as `sparsity_masks.safetensors` beside a model's weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import MASKS_FILENAME, normalize_patterns
from .model import WeightMasks, apply_masks, find_prunable_linears, get_masks, mask_sparsity


FORMAT_NAME = "hf_sparse.weight_masks"
FORMAT_VERSION = "1"


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A directory (existing, or a path without suffix) means `<dir>/sparsity_masks.safetensors`."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        return path / MASKS_FILENAME
    return path


def save_masks(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write the masks attached to `model` to a safetensors file and return its path.

    Tensors are boolean, keyed by module name. `metadata` (e.g. method, target_sparsity, patterns) is stored
    JSON-encoded in the file header, with the format name/version and the measured mask sparsity.
    """
    masks = get_masks(model)
    if not masks:
        raise ValueError(f"{type(model).__name__} carries no weight masks to save (see `apply_masks`).")
    path = _resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    header.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, sparsity=json.dumps(mask_sparsity(masks)))
    tensors = {name: mask.detach().to("cpu", torch.bool).contiguous() for name, mask in masks.items()}
    save_file(tensors, str(path), metadata=header)
    return path


def read_masks(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a mask file without touching any model: (masks, metadata). Errors name the file."""
    path = _resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"No mask file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            masks = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"Mask file {path} is corrupted or not a safetensors file: {error}") from error
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an hf_sparse mask file (header format {header.get('format')!r}).")
    metadata = {}
    for key, value in header.items():
        if key in ("format", "format_version"):
            continue
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"Mask file {path} has unreadable metadata `{key}`: {value!r}") from error
    for name, mask in masks.items():
        if mask.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"Mask file {path}: `{name}` has dtype {mask.dtype}; expected bool or uint8.")
        if mask.dtype == torch.uint8 and bool((mask > 1).any()):
            raise ValueError(f"Mask file {path}: `{name}` holds values other than 0 and 1.")
    return {name: mask.bool() for name, mask in masks.items()}, metadata


def load_masks(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> WeightMasks:
    """Load a mask file into `model` (attaching buffers, zeroing pruned weights) and return the handle.

    Every name must be an `nn.Linear` of `model` with the same weight shape. With `strict` and `patterns` in the
    file's metadata, the Linears of `model` matching those patterns must be exactly the file's names (a mask
    file from a deeper or differently named model fails instead of leaving layers dense).
    """
    masks, metadata = read_masks(path)
    path = _resolve(path)
    if not masks:
        raise ValueError(f"Mask file {path} holds no mask.")
    modules = dict(model.named_modules())
    missing = [name for name in masks if not isinstance(modules.get(name), nn.Linear)]
    if missing:
        raise ValueError(f"Mask file {path} names modules that are not nn.Linear modules of the model: {missing[:5]}.")
    wrong = [
        f"{name}: file {tuple(mask.shape)} vs model {tuple(modules[name].weight.shape)}"
        for name, mask in masks.items()
        if tuple(mask.shape) != tuple(modules[name].weight.shape)
    ]
    if wrong:
        raise ValueError(f"Mask file {path} does not fit the model; shape mismatch for {wrong[:5]}.")
    if strict and metadata.get("patterns"):
        expected = set(find_prunable_linears(model, normalize_patterns(metadata["patterns"])))
        if expected != set(masks):
            raise ValueError(
                f"Mask file {path} covers {len(masks)} modules but the model has {len(expected)} matching its "
                f"patterns; unmasked: {sorted(expected - set(masks))[:5]}, extra: {sorted(set(masks) - expected)[:5]}."
            )
    return apply_masks(model, masks, metadata=metadata)
