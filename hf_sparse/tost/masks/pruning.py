"""Pruning at initialisation: `compute_masks` (scores -> masks) and `prune_model` (compute + attach)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..batches import LossFn, example_inputs_from_batch, take_batches
from .config import MaskConfig
from .model import WeightMasks, apply_masks
from .scores import grasp_scores, magnitude_scores, masks_from_scores, random_scores, snip_scores, synflow_masks


def _synflow_inputs(model: nn.Module, batches: Iterable[Any] | None, example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    if batches is not None:
        return example_inputs_from_batch(take_batches(batches, 1)[0])
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):  # HF vision models: only the input shape matters
        return {"pixel_values": torch.ones(1, channels, size, size)}
    raise ValueError(
        "SynFlow needs the input shape: pass `example_inputs` (a tensor or a dict of model inputs) or `batches`."
    )


def compute_masks(
    model: nn.Module,
    config: MaskConfig,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
) -> dict[str, torch.Tensor]:
    """Boolean masks (module name -> mask shaped like the weight, True = kept) for the prunable Linears.

    Args:
        model: any module with `nn.Linear` layers matched by `config.patterns`; left unchanged.
        config: method, target sparsity, scope and method options.
        batches: data for "snip" and "grasp" (first `config.num_batches` are used); "synflow" takes the input
            shape from the first one if `example_inputs` is not given.
        loss_fn: `loss_fn(model, batch) -> loss`; default: the model's `.loss` / cross-entropy (GraSP: on
            `logits / config.grasp_temperature`).
        example_inputs: SynFlow's input template (a tensor or a dict of keyword inputs); HF vision models fall
            back to `config.image_size` / `config.num_channels`.

    The fraction of pruned prunable weights is `config.sparsity` up to rounding to whole weights
    (globally, or in each layer with `scope="layer"`). "random" always uses one density for every layer.
    """
    if not isinstance(config, MaskConfig):
        raise TypeError(f"`config` must be a MaskConfig, got {type(config).__name__}.")
    method, patterns = config.method, config.patterns
    if method == "synflow":
        return synflow_masks(
            model,
            config.sparsity,
            _synflow_inputs(model, batches, example_inputs),
            rounds=config.synflow_rounds,
            scope=config.scope,
            patterns=patterns,
        )
    scope = config.scope
    if method == "random":
        generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
        scores = random_scores(model, patterns, generator)
        scope = "layer"  # uniform density per layer, exactly
    elif method == "magnitude":
        scores = magnitude_scores(model, patterns)
    elif method == "snip":
        scores = snip_scores(model, batches, loss_fn, config.num_batches, patterns)
    else:  # "grasp"; MaskConfig validated the method
        scores = grasp_scores(model, batches, loss_fn, config.num_batches, config.grasp_temperature, patterns)
    return masks_from_scores(scores, config.sparsity, scope)


def prune_model(
    model: nn.Module,
    config: MaskConfig,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
) -> WeightMasks:
    """`compute_masks` then `apply_masks`: the model's pruned weights become zero and stay so in training."""
    masks = compute_masks(model, config, batches=batches, loss_fn=loss_fn, example_inputs=example_inputs)
    return apply_masks(model, masks, metadata=config.to_metadata())
