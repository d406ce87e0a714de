"""Ghost soft neurons: a smoother activation early in training that anneals back to the model's own.

For self-gated smooth activations (GELU and its tanh/sigmoid approximations, SiLU, Mish), kind "gelu":

    phi_s(x) = act(lambda_s * x) / lambda_s,   lambda_s = lambda_0 + (1 - lambda_0) * s

which for GELU is x * Phi(lambda_s * x): a lower lambda passes more gradient for negative inputs. For ReLU-type
activations, kind "relu" (the ToST paper's Swish -> ReLU):

    phi_s(x) = (1 - s) * x * sigmoid(x) + s * act(x)

At s = 1 both return `act(x)` itself (bit-exact), and `remove()` puts the original module objects back, so the
final architecture is the model's own. The ghost is parameterless: state_dict keys never change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...validation import check_choice, check_fraction, check_positive


GHOST_ACTIVATION_KINDS: tuple[str, ...] = ("auto", "gelu", "relu")
DEFAULT_GHOST_MLP_PATTERN = r"(^|\.)mlp$"
"""On a ViT, the modules whose `activation_fn` is replaced (the MLP of each SparseViT / HF ViT block)."""
DEFAULT_GHOST_ATTRIBUTE = "activation_fn"

_SMOOTH_NAMES = ("gelu", "silu", "swish", "mish")


def infer_activation_kind(activation: nn.Module) -> str:
    """"relu" for ReLU-type modules, "gelu" for self-gated smooth ones (GELU variants, SiLU, Mish)."""
    name = type(activation).__name__.lower()
    if isinstance(activation, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)) or "relu" in name:
        return "relu"
    if isinstance(activation, (nn.GELU, nn.SiLU, nn.Mish)) or any(key in name for key in _SMOOTH_NAMES):
        return "gelu"
    raise ValueError(
        f"Cannot infer the ghost kind of {type(activation).__name__}: pass `kind=\"gelu\"` (self-gated smooth "
        "activations) or `kind=\"relu\"` (piecewise-linear ones)."
    )


class GhostActivation(nn.Module):
    """Wraps `original_act` and follows it more closely as `progress` goes from 0 to 1 (see module docstring)."""

    def __init__(
        self, original_act: nn.Module, kind: str = "auto", lambda_0: float = 0.5, progress: float = 0.0
    ) -> None:
        super().__init__()
        check_choice("kind", kind, GHOST_ACTIVATION_KINDS)
        check_positive("lambda_0", lambda_0)
        if not isinstance(original_act, nn.Module):
            raise TypeError(f"`original_act` must be an nn.Module, got {type(original_act).__name__}.")
        if any(True for _ in original_act.parameters()) or any(True for _ in original_act.buffers()):
            raise ValueError(
                f"{type(original_act).__name__} has parameters or buffers; ghost activations wrap parameterless "
                "activations only (so state_dict keys never change)."
            )
        self.original = original_act
        self.kind = infer_activation_kind(original_act) if kind == "auto" else kind
        self.lambda_0 = float(lambda_0)
        self.progress = 0.0
        self.set_progress(progress)

    def set_progress(self, progress: float) -> None:
        check_fraction("progress", progress, high_inclusive=True)
        self.progress = float(progress)

    @property
    def sharpness(self) -> float:
        """lambda_s of the "gelu" kind."""
        return self.lambda_0 + (1.0 - self.lambda_0) * self.progress

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.progress >= 1.0:
            return self.original(hidden_states)
        if self.kind == "gelu":
            sharpness = self.sharpness
            return self.original(hidden_states * sharpness) / sharpness
        return (1.0 - self.progress) * F.silu(hidden_states) + self.progress * self.original(hidden_states)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, lambda_0={self.lambda_0}, progress={self.progress:.4f}"


class _Replacement(NamedTuple):
    parent: nn.Module
    attribute: str
    original: nn.Module
    ghost: GhostActivation


class GhostActivations:
    """Handle on the ghost activations attached to a model: `set_progress(s)` each step, `remove()` at the end."""

    def __init__(self, replaced: dict[str, _Replacement]) -> None:
        self._replaced = replaced

    @property
    def modules(self) -> dict[str, GhostActivation]:
        """Where each ghost sits -> the ghost (empty after `remove()`): the parent module's name for a ViT's
        `mlp.activation_fn` (and with an explicit `pattern`), else the activation's own name."""
        return {name: entry.ghost for name, entry in self._replaced.items()}

    @property
    def active(self) -> bool:
        return bool(self._replaced)

    def set_progress(self, progress: float) -> None:
        check_fraction("progress", progress, high_inclusive=True)
        for entry in self._replaced.values():
            entry.ghost.set_progress(progress)

    def remove(self) -> None:
        """Put the original activation objects back (idempotent)."""
        for entry in self._replaced.values():
            if getattr(entry.parent, entry.attribute) is entry.ghost:
                setattr(entry.parent, entry.attribute, entry.original)
        self._replaced = {}


def _is_ghostable(module: nn.Module) -> bool:
    """A parameterless activation of the ReLU or self-gated smooth families (not Identity, Tanh, Sigmoid ...)."""
    try:
        infer_activation_kind(module)
    except ValueError:
        return False
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())


def _default_targets(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(key, parent, attribute) of the activations to replace by default: the MLP activations of a ViT (key: the
    MLP's name) or, on a model without them (a CNN), every ReLU/GELU-family activation module (key: its name)."""
    mlp = re.compile(DEFAULT_GHOST_MLP_PATTERN)
    targets = [
        (name, module, DEFAULT_GHOST_ATTRIBUTE)
        for name, module in model.named_modules()
        if mlp.search(name) and isinstance(getattr(module, DEFAULT_GHOST_ATTRIBUTE, None), nn.Module)
    ]
    if targets:
        return targets
    return [
        (f"{name}.{attribute}" if name else attribute, module, attribute)
        for name, module in model.named_modules()
        for attribute, child in module.named_children()
        if _is_ghostable(child) or isinstance(child, GhostActivation)
    ]


def attach_ghost_activations(
    model: nn.Module,
    pattern: str | Sequence[str] | None = None,
    attribute: str = DEFAULT_GHOST_ATTRIBUTE,
    kind: str = "auto",
    lambda_0: float = 0.5,
    progress: float = 0.0,
) -> GhostActivations:
    """Replace activations by `GhostActivation`s: `<module>.<attribute>` on every module whose name matches
    `pattern`, or by default the MLP activations of a ViT (`mlp.activation_fn`) or, on a model without them, every
    ReLU/GELU-family activation module (a CNN's ReLUs)."""
    if pattern is None:
        targets = _default_targets(model)
        patterns = [DEFAULT_GHOST_MLP_PATTERN]
    else:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        compiled = [re.compile(item) for item in patterns]
        targets = [
            (name, module, attribute)
            for name, module in model.named_modules()
            if any(regex.search(name) for regex in compiled)
        ]
    replaced: dict[str, _Replacement] = {}
    for key, module, target_attribute in targets:
        original = getattr(module, target_attribute, None)
        if isinstance(original, GhostActivation):
            raise ValueError(f"`{key}` already holds a GhostActivation; remove the first ghosts first.")
        if not isinstance(original, nn.Module):
            continue
        replaced[key] = _Replacement(
            module, target_attribute, original, GhostActivation(original, kind, lambda_0, progress)
        )
    if not replaced:
        raise ValueError(
            f"No module of {type(model).__name__} matching `pattern` {patterns} has an nn.Module attribute "
            f"`{attribute}`, and it has no ReLU/GELU-family activation module; pass `pattern=` / `attribute=` for "
            "your model."
        )
    for entry in replaced.values():
        setattr(entry.parent, entry.attribute, entry.ghost)
    return GhostActivations(replaced)
