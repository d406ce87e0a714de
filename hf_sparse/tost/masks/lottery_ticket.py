"""Lottery tickets by iterative magnitude pruning (IMP) with rewinding (Frankle & Carbin 2019; Frankle et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...logging_utils import get_logger
from ...validation import check_choice, check_fraction
from .config import DEFAULT_PRUNABLE_PATTERNS, MASK_SCOPES, normalize_patterns
from .model import WeightMasks, apply_masks, find_prunable_layers, get_masks, mask_sparsity, sparsity_report
from .scores import masks_from_scores


logger = get_logger(__name__)

REWIND_MODES: tuple[str, ...] = ("init", "step")

TrainFn = Callable[[nn.Module, dict[str, torch.Tensor]], Any]
"""`train_fn(model, masks)`: train the masked model for one round (its own optimizer, schedule and budget).
The masks are attached, so gradients of pruned weights are already zero; call `reapply(model)` after each
optimizer step as in any masked training."""


def sparsity_after_rounds(rounds: int, prune_fraction_per_round: float = 0.2) -> float:
    """1 - (1 - f) ** rounds: 20 %, 36 %, 48.8 % ... for f = 0.2."""
    return 1.0 - (1.0 - prune_fraction_per_round) ** rounds


def rounds_for_sparsity(target_sparsity: float, prune_fraction_per_round: float = 0.2) -> int:
    """The fewest IMP rounds whose sparsity reaches `target_sparsity` (e.g. 0.9 -> 11 rounds, 91.4 %)."""
    check_fraction("target_sparsity", target_sparsity)
    check_fraction("prune_fraction_per_round", prune_fraction_per_round, low_inclusive=False)
    if target_sparsity == 0:
        return 0
    # The small slack absorbs float error: 1 - 0.8 ** 2 is 0.35999999999999993, not 0.36.
    return max(1, math.ceil(math.log(1.0 - target_sparsity) / math.log(1.0 - prune_fraction_per_round) - 1e-9))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _rewind(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)  # copies in place: parameters and their hooks are kept
    if result.unexpected_keys:
        raise ValueError(f"`rewind_state` holds keys the model lacks: {result.unexpected_keys[:5]}.")


def iterative_magnitude_pruning(
    model: nn.Module,
    train_fn: TrainFn,
    rounds: int,
    prune_fraction_per_round: float = 0.2,
    rewind: str = "init",
    rewind_state: Mapping[str, torch.Tensor] | None = None,
    *,
    scope: str = "global",
    patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS,
    on_round_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> WeightMasks:
    """Find a lottery ticket: `rounds` times train, prune, rewind.

    Each round calls `train_fn(model, masks)`, then prunes `prune_fraction_per_round` of the surviving prunable
    weights by magnitude (globally, or per layer with `scope="layer"`), then rewinds every tensor of the model to
    the rewind state and zeroes the pruned weights. After round k the sparsity is 1 - (1 - f) ** k of the weights
    that were alive at the start (exactly, up to rounding to whole weights): the count is computed from the start,
    not compounded round by round, so rounding never drifts.

    Args:
        rewind: "init": rewind to the model's state when this function is called (or to `rewind_state` if given);
            "step": rewind to `rewind_state`, a `state_dict()` saved after a few steps of dense training
            (Frankle et al. 2020's late rewinding); it is required then. A partial state rewinds only its tensors.
        on_round_end: called as `on_round_end(round, sparsity_report(model))` after each rewind.

    Returns the handle of the masks attached to the (rewound) model, ready for the final training.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive integer, got {rounds!r}.")
    check_fraction("prune_fraction_per_round", prune_fraction_per_round, low_inclusive=False)
    check_choice("rewind", rewind, REWIND_MODES)
    check_choice("scope", scope, MASK_SCOPES)
    patterns = normalize_patterns(patterns)
    if rewind == "step" and rewind_state is None:
        raise ValueError('`rewind_state` is required with rewind="step": pass a state_dict saved early in training.')
    state = _snapshot(model) if rewind_state is None else rewind_state

    linears = find_prunable_layers(model, patterns)
    masks = get_masks(model)
    masks = {  # a model that already carries masks is pruned further inside them
        name: masks[name].clone() if name in masks else torch.ones_like(module.weight, dtype=torch.bool)
        for name, module in linears.items()
    }
    start_density = 1.0 - mask_sparsity(masks)
    metadata = {
        "method": "lottery_ticket",
        "rewind": rewind,
        "prune_fraction_per_round": prune_fraction_per_round,
        "scope": scope,
        "patterns": list(patterns),
    }
    handle = apply_masks(model, masks, metadata=metadata)
    for round_index in range(1, rounds + 1):
        train_fn(model, handle.masks)
        target = 1.0 - start_density * (1.0 - prune_fraction_per_round) ** round_index
        scores = {name: module.weight.detach().abs().float() for name, module in linears.items()}
        masks = masks_from_scores(scores, target, scope, current_masks=handle.masks)
        _rewind(model, state)
        handle = apply_masks(model, masks, metadata={**metadata, "rounds": round_index, "target_sparsity": target})
        report = sparsity_report(model)
        logger.info("IMP round %d/%d, sparsity %.3f", round_index, rounds, report["prunable_sparsity"])
        if on_round_end is not None:
            on_round_end(round_index, report)
    return handle
