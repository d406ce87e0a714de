"""The mask file, `sparsity_masks.safetensors`: boolean tensors keyed by module name, metadata in the header.

File-level only (no model here): `save_masks` / `load_masks` in `model.py` attach and detach.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MASKS_FILENAME


FORMAT_NAME = "hf_sparse.weight_masks"
FORMAT_VERSION = "1"


def resolve_mask_path(path: str | os.PathLike[str]) -> Path:
    """A directory (existing, or a path without suffix) means `<dir>/sparsity_masks.safetensors`."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        return path / MASKS_FILENAME
    return path


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of False entries over all masks."""
    total = sum(mask.numel() for mask in masks.values())
    kept = sum(int(mask.sum()) for mask in masks.values())
    return 1.0 - kept / max(total, 1)


def write_mask_file(
    masks: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write `masks` (module name -> boolean tensor) and return the file's path.

    `metadata` (e.g. method, target_sparsity, patterns) is stored JSON-encoded in the header, with the format
    name/version and the measured mask sparsity.
    """
    path = resolve_mask_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    header.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, sparsity=json.dumps(mask_sparsity(masks)))
    tensors = {name: mask.detach().to("cpu", torch.bool).contiguous() for name, mask in masks.items()}
    save_file(tensors, str(path), metadata=header)
    return path


def read_masks(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a mask file without touching any model: (masks, metadata). Errors name the file."""
    path = resolve_mask_path(path)
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
