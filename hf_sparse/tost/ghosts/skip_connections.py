"""Ghost skip connections: y = layer(x) + alpha * G(x) around each sparse layer, alpha annealed to 0, then deleted.

Two forms, one per model family, each as its authors built it:

* **CNNs** (`ConvGhostBranches`, the ToST code's `conv_jump`): around each masked k x k convolution (k > 1; the 1x1
  ones, shortcuts included, get none) a trainable dense branch, a 1x1 convolution with the main convolution's stride
  (weights filled with 1e-4, no bias) and its own BatchNorm, reads the convolution's input; alpha times its output is
  added after the main path's normalisation (the BatchNorm that follows the convolution) and before the activation:
  for transformers' `ResNetConvLayer`, conv -> BN -> (+ alpha * branch(x)) -> activation. The main path's batch
  statistics and gradients are its own. The branches live outside the model (never in its `state_dict`); their
  parameters train with the run's optimizer (`GhostCallback` adds them as parameter groups and drops them, with their
  state, when the branches are deleted).
* **Linear layers** (`GhostSkips`, ViT): G is parameter-free and identity-like, so nothing is learned that would
  have to be folded back. On the feature axis (the last one of a Linear, the channel axis of a convolution):

  * square (in == out): G(x) = x;
  * expanding (out = m * in, e.g. fc1): x tiled m times, [x, x, ..., x];
  * contracting (in = m * out, e.g. fc2): the mean of the m consecutive chunks of size `out` (so fc2 after fc1
    maps the tiled x back to x);
  * other shapes: `adaptive_avg_pool1d` resampling of the feature axis (averaging windows when shrinking,
    repeating entries when growing). A fixed random projection would need a buffer; resampling needs none.

  Around a convolution whose output is spatially smaller (a stride), the input is first average-pooled to the
  output's size (`adaptive_avg_pool`), so a strided 3x3 convolution gets an average-pooled, channel-mapped x
  (`identity_like_feature_map`: our earlier CNN form, added before the BatchNorm; kept for explicit `patterns`).

Both are forward hooks: the model's module names, parameters and state_dict keys never change, and `remove()` deletes
the hooks. With alpha = 0 a hook returns nothing, so the output is exactly the layer's own.
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


class _AnnealedHooks:
    """What both ghost-skip forms share: alpha from the schedule at the run's progress, and the hooks that add it."""

    _hooks: list[RemovableHandle]

    def _init_schedule(self, alpha_0: float, schedule: str, progress: float) -> None:
        check_positive("alpha_0", alpha_0, allow_zero=True)
        check_choice("schedule", schedule, GHOST_SKIP_SCHEDULES)
        self.alpha_0 = float(alpha_0)
        self.schedule = schedule
        self.set_progress(progress)

    def set_progress(self, progress: float) -> None:
        self.alpha = ghost_skip_alpha(progress, self.alpha_0, self.schedule)
        self.progress = float(progress)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class GhostSkips(_AnnealedHooks):
    """Forward hooks adding alpha * G(x) to the output of each target layer (see module docstring)."""

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        alpha_0: float = 1.0,
        schedule: str = "linear",
        progress: float = 0.0,
    ) -> None:
        self._init_schedule(alpha_0, schedule, progress)
        self.module_names = list(modules)
        self._hooks = [module.register_forward_hook(self._hook, with_kwargs=True) for module in modules.values()]

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
        self._remove_hooks()


GHOST_BRANCH_INIT = 1e-4
"""The ToST code's initial value of every weight of a branch's 1x1 convolution (`conv_jump.weight.data.fill_(0.0001)`).
With the branch's own BatchNorm (eps 1e-5) this starts the branch at about a tenth of the main path's scale."""


class GhostBranch(nn.Module):
    """The dense branch around one k x k convolution: a 1x1 convolution (its stride, no bias, weights 1e-4), then a
    BatchNorm."""

    def __init__(self, convolution: nn.Conv2d, init_value: float = GHOST_BRANCH_INIT) -> None:
        super().__init__()
        factory = {"device": convolution.weight.device, "dtype": convolution.weight.dtype}
        self.convolution = nn.Conv2d(convolution.in_channels, convolution.out_channels, kernel_size=1,
                                     stride=convolution.stride, bias=False, **factory)
        nn.init.constant_(self.convolution.weight, init_value)
        self.normalization = nn.BatchNorm2d(convolution.out_channels, **factory)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(hidden_states))


def _branch_key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


def _join_module(model: nn.Module, name: str, convolution: nn.Module) -> nn.Module:
    """Where the branch joins: the BatchNorm registered right after the convolution in its parent (transformers'
    `ResNetConvLayer`, conv-bn `Sequential`s), else the convolution itself."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    children = list(parent.children())
    position = next(index for index, child in enumerate(children) if child is convolution)
    following = children[position + 1] if position + 1 < len(children) else None
    return following if isinstance(following, nn.modules.batchnorm._BatchNorm) else convolution


def _is_spatial_convolution(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and any(size > 1 for size in module.kernel_size)


class ConvGhostBranches(_AnnealedHooks, nn.Module):
    """The CNN ghost skips (see module docstring): one `GhostBranch` per k x k convolution, added after the
    normalisation that follows it, scaled by alpha. Holds the branches (`branches`, keyed by the convolution's name
    with dots as "__"); the model holds only hooks."""

    def __init__(
        self,
        model: nn.Module,
        convolution_names: Sequence[str],
        alpha_0: float = 1.0,
        schedule: str = "linear",
        progress: float = 0.0,
        init_value: float = GHOST_BRANCH_INIT,
    ) -> None:
        super().__init__()
        self._init_schedule(alpha_0, schedule, progress)
        if not convolution_names:
            raise ValueError("ConvGhostBranches needs at least one k x k (k > 1) nn.Conv2d to wrap.")
        self.module_names = list(convolution_names)
        self.branches = nn.ModuleDict()
        self._inputs: dict[str, torch.Tensor] = {}
        self._hooks = []
        for name in self.module_names:
            convolution = model.get_submodule(name)
            if not _is_spatial_convolution(convolution):
                raise ValueError(f"`{name}` is not a k x k (k > 1) nn.Conv2d; ghost branches wrap only those.")
            padding = convolution.padding
            if padding == "valid" or (padding != "same" and any(
                    pad != size // 2 for pad, size in zip(padding, convolution.kernel_size))):
                raise ValueError(f"`{name}` is not padded to keep its size (padding {padding!r}): a 1x1 branch "
                                 "with its stride would not match its output.")
            key = _branch_key(name)
            self.branches[key] = GhostBranch(convolution, init_value)
            join = _join_module(model, name, convolution)
            self._hooks.append(convolution.register_forward_pre_hook(self._capture(key)))
            self._hooks.append(join.register_forward_hook(self._add(key)))

    def _capture(self, key: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._inputs[key] = args[0]
        return hook

    def _add(self, key: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            hidden_states = self._inputs.pop(key, None)  # dropped at once: no activation outlives its forward
            if self.alpha == 0.0 or hidden_states is None:
                return None
            branch = self.branches[key]
            if branch.training != module.training:
                branch.train(module.training)  # the branches are outside the model: follow its train/eval mode
            return output + (self.alpha * branch(hidden_states)).to(output.dtype)
        return hook

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups as the Trainer makes them: weight decay on the 1x1 convolutions, none on the BatchNorms."""
        decay = [branch.convolution.weight for branch in self.branches.values()]
        no_decay = [p for branch in self.branches.values() for p in branch.normalization.parameters()]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def remove(self) -> None:
        """Delete the hooks (idempotent); the branches go with this object."""
        self._remove_hooks()
        self._inputs.clear()


def ghost_branch_convolutions(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    """The names among `modules` that get a CNN ghost branch: the k x k (k > 1) convolutions."""
    return [name for name, module in modules.items() if _is_spatial_convolution(module)]


def attach_ghost_skips(
    model: nn.Module,
    patterns: str | Sequence[str] | None = None,
    alpha_0: float = 1.0,
    schedule: str = "linear",
    progress: float = 0.0,
) -> GhostSkips | ConvGhostBranches:
    """Add ghost skips around the masked layers of `model` (or, without masks, its default prunable layers).

    Without `patterns`, a model whose targets are convolutions (a CNN) gets the ToST code's trainable branches around
    its k x k convolutions (`ConvGhostBranches`: train their `parameters()` with the model's); other models (ViT) get
    the parameter-free skips around their Linears (`GhostSkips`). Explicit `patterns` select the layers by name and
    always get the parameter-free form.
    """
    if patterns is not None:
        return GhostSkips(find_prunable_layers(model, patterns), alpha_0=alpha_0, schedule=schedule, progress=progress)
    modules = masked_modules(model) or find_prunable_layers(model, DEFAULT_PRUNABLE_PATTERNS)
    if any(isinstance(module, nn.modules.conv._ConvNd) for module in modules.values()):
        return ConvGhostBranches(model, ghost_branch_convolutions(model, modules), alpha_0=alpha_0,
                                 schedule=schedule, progress=progress)
    return GhostSkips(modules, alpha_0=alpha_0, schedule=schedule, progress=progress)
