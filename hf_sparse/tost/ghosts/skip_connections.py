"""Ghost skip connections: y = layer(x) + alpha * G(x) around each sparse layer, alpha annealed to 0, then deleted.

G is parameter-free and identity-like, so nothing is learned that would have to be folded back. On the feature
axis (the last one of a Linear, the channel axis of a convolution):

* square (in == out): G(x) = x;
* expanding (out = m * in, e.g. fc1): x tiled m times, [x, x, ..., x];
* contracting (in = m * out, e.g. fc2): the mean of the m consecutive chunks of size `out` (so fc2 after fc1
  maps the tiled x back to x);
* other shapes: `adaptive_avg_pool1d` resampling of the feature axis (averaging windows when shrinking,
  repeating entries when growing). A fixed random projection would need a buffer; resampling needs none.

Around a convolution whose output is spatially smaller (a stride), the input is first average-pooled to the
output's size (`adaptive_avg_pool`), so a strided 3x3 convolution gets an average-pooled, channel-mapped x.

The branch is a forward hook: module names, parameters and state_dict keys never change, and `remove()` deletes
the hooks. With alpha = 0 the hook returns nothing, so the output is exactly the Linear's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...validation import check_choice, check_fraction, check_positive
from ..masks.config import DEFAULT_PRUNABLE_PATTERNS
from ..masks.model import find_prunable_layers, masked_modules


GHOST_SKIP_SCHEDULES: tuple[str, ...] = ("linear", "cosine")


def identity_like(hidden_states: torch.Tensor, out_features: int) -> torch.Tensor:
    """Map the last dimension of `hidden_states` to `out_features` without parameters (see module docstring)."""
    in_features = hidden_states.shape[-1]
    if in_features == out_features:
        return hidden_states
    if out_features % in_features == 0:
        return hidden_states.repeat(*([1] * (hidden_states.dim() - 1)), out_features // in_features)
    if in_features % out_features == 0:
        return hidden_states.unflatten(-1, (in_features // out_features, out_features)).mean(dim=-2)
    flat = hidden_states.reshape(-1, 1, in_features)
    return F.adaptive_avg_pool1d(flat, out_features).reshape(*hidden_states.shape[:-1], out_features)


def identity_like_feature_map(hidden_states: torch.Tensor, output_shape: torch.Size) -> torch.Tensor:
    """Map a convolution's input `(batch, channels, *spatial)` to its output shape without parameters: average-pool
    the spatial axes to the output's size, then map the channels with `identity_like`."""
    spatial = tuple(output_shape[2:])
    if tuple(hidden_states.shape[2:]) != spatial:
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(spatial)]
        hidden_states = pool(hidden_states, spatial)
    return identity_like(hidden_states.movedim(1, -1), output_shape[1]).movedim(-1, 1)


def ghost_skip_alpha(progress: float, alpha_0: float = 1.0, schedule: str = "linear") -> float:
    """alpha_0 * (1 - s) ("linear") or alpha_0 * (1 + cos(pi * s)) / 2 ("cosine")."""
    check_fraction("progress", progress, high_inclusive=True)
    check_choice("schedule", schedule, GHOST_SKIP_SCHEDULES)
    if progress >= 1.0:
        return 0.0
    if schedule == "linear":
        return alpha_0 * (1.0 - progress)
    return alpha_0 * 0.5 * (1.0 + math.cos(math.pi * progress))


class GhostSkips:
    """Forward hooks adding alpha * G(x) to the output of each target layer (see module docstring)."""

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        alpha_0: float = 1.0,
        schedule: str = "linear",
        progress: float = 0.0,
    ) -> None:
        check_positive("alpha_0", alpha_0, allow_zero=True)
        check_choice("schedule", schedule, GHOST_SKIP_SCHEDULES)
        self.alpha_0 = float(alpha_0)
        self.schedule = schedule
        self.alpha = 0.0
        self.progress = 0.0
        self.set_progress(progress)
        self.module_names = list(modules)
        self._hooks: list[RemovableHandle] = [
            module.register_forward_hook(self._hook, with_kwargs=True) for module in modules.values()
        ]

    def set_progress(self, progress: float) -> None:
        self.alpha = ghost_skip_alpha(progress, self.alpha_0, self.schedule)
        self.progress = float(progress)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor | None:
        if self.alpha == 0.0:
            return None
        hidden_states = args[0] if args else kwargs["input"]
        if isinstance(module, nn.Linear):
            ghost = identity_like(hidden_states, module.out_features)
        else:
            ghost = identity_like_feature_map(hidden_states, output.shape)
        return output + (self.alpha * ghost).to(output.dtype)  # under autocast the Linear's output is bf16/fp16

    def remove(self) -> None:
        """Delete the hooks (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def attach_ghost_skips(
    model: nn.Module,
    patterns: str | Sequence[str] | None = None,
    alpha_0: float = 1.0,
    schedule: str = "linear",
    progress: float = 0.0,
) -> GhostSkips:
    """Add ghost skips around the masked layers of `model` (or, without masks, its default prunable layers);
    explicit `patterns` select the layers by name instead."""
    if patterns is None:
        modules = masked_modules(model) or find_prunable_layers(model, DEFAULT_PRUNABLE_PATTERNS)
    else:
        modules = find_prunable_layers(model, patterns)
    return GhostSkips(modules, alpha_0=alpha_0, schedule=schedule, progress=progress)
