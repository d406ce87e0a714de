"""Layer-wise rescaled initialisation (LRsI): GradInit (Zhu et al. 2021) applied to a masked network, as in ToST.

One learned scale alpha_i >= min_scale per parameter tensor (>= 0 for biases), theta_i = alpha_i * theta_i0, so pruned
zeros stay zero. As in the ToST code (`LRsI/gradinit_utils.py`, README command), each iteration concatenates two
batches and computes g = grad L(theta) on them, masked (g * M) for masked tensors:

* if ||g|| > gamma, the objective is ||g|| (bring the gradient norm down);
* else it is the loss, on the first of those batches and a fresh one, after the masked look-ahead step
  theta' = theta - eta * g / ||g|| (theta - eta * g without `normalize_grad`): "which scales make one SGD step most
  useful".

Both objectives differentiate through g (a double backward). The scales follow the ToST code's `RescaleAdam`: each
scale's gradient is clipped to [-grad_clip, grad_clip] on its own (per dimension), the first moment is kept apart
for the two objectives while the second is shared, and a scale never goes below its group's floor (`min_scale` for
weights, 0 for biases); a tensor that starts at zero (a batch norm's bias) is left alone. Weights, normalisation
weights and biases are scaled, as theirs (every Conv/Linear/BatchNorm tensor). Batch norms use the batch's statistics
without updating their running ones and dropout is off, as in their `set_bn_modes` after `net.eval()`. Finally
theta_i = alpha_i * theta_i0 is written into the model. Unlike the ToST code the look-ahead is masked and GradInit runs
after masking, and the scales also cover LayerNorm weights (transformers).

Double backward through attention: torch's fused CPU SDPA kernel has none. Everything here runs under
`sdpa_kernel(SDPBackend.MATH)`, which also makes SDPA-attention models work; eager attention
(`model.config._attn_implementation = "eager"`) works as well.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...logging_utils import get_logger
from ..masks.model import get_masks
from ...validation import check_positive
from ..batches import BatchCycler, LossFn, default_loss_fn


logger = get_logger(__name__)


@dataclass
class GradInitReport:
    """What `gradinit_rescale` did: final scale per tensor, loss on a fixed batch before/after, per-step log."""

    scales: dict[str, float]
    loss_before: float
    loss_after: float
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


class _LossModule(nn.Module):
    """Wraps `loss_fn(model, batch)` so `functional_call` can swap the model's parameters during the call."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()


def scaled_parameter_names(
    model: nn.Module, include_layernorm: bool = True, include_bias: bool = False, include_embeddings: bool = False
) -> list[str]:
    """The trainable tensors that get a GradInit scale.

    Always the weights of non-normalisation modules (Linear, Conv, ...); normalisation weights with
    `include_layernorm`; biases with `include_bias`; other tensors (CLS token, position embeddings) with
    `include_embeddings`.
    """
    category: dict[int, str] = {}
    for module in model.modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            if param_name == "bias":
                category[id(parameter)] = "bias"
            elif param_name == "weight":
                category[id(parameter)] = "norm" if _is_norm(module) else "weight"
            else:
                category[id(parameter)] = "other"
    wanted = {"weight": True, "norm": include_layernorm, "bias": include_bias, "other": include_embeddings}
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and wanted[category[id(parameter)]]
    ]


def concat_batches(first: Any, second: Any) -> Any:
    """Two collated batches as one (dicts and (inputs, labels) pairs of tensors): GradInit's double batch."""
    if isinstance(first, Mapping):
        return {key: torch.cat([value, second[key]]) if isinstance(value, torch.Tensor) else value
                for key, value in first.items()}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches(a, b) for a, b in zip(first, second))
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    raise TypeError(f"Cannot concatenate batches of type {type(first).__name__}: use dicts or (inputs, labels) pairs.")


@contextlib.contextmanager
def batch_statistics_without_running_update(model: nn.Module) -> Iterator[None]:
    """`model.eval()` (no dropout) with every batch norm normalising by the batch's statistics and leaving its running
    statistics untouched (the ToST code's `set_bn_modes`); the modes are restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = {m: m.track_running_stats for m in norms}
    model.eval()
    for norm in norms:
        norm.training, norm.track_running_stats = True, False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = tracking[norm]
        for module, training in modes.items():
            module.training = training


class RescaleAdam:
    """The ToST code's `RescaleAdam` on scalar scales: a per-scale gradient clipped to +/- `grad_clip`, separate first
    moments for the gradient-norm ("constraint") and look-ahead steps, one shared second moment, and a floor per scale.
    A scale whose tensor starts at zero is skipped (nothing to scale)."""

    def __init__(self, floors: Mapping[str, float], zero_at_start: set[str], lr: float, grad_clip: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.floors, self.skipped = dict(floors), set(zero_at_start)
        self.lr, self.grad_clip, self.betas, self.eps = lr, grad_clip, betas, eps
        names = [name for name in self.floors if name not in self.skipped]
        self.first = {kind: dict.fromkeys(names, 0.0) for kind in ("grad_norm", "lookahead")}
        self.second = dict.fromkeys(names, 0.0)
        self.steps = {kind: 0 for kind in ("grad_norm", "lookahead")}

    def step(self, scales: Mapping[str, torch.Tensor], grads: Mapping[str, float], kind: str) -> None:
        beta1, beta2 = self.betas
        self.steps[kind] += 1
        correction1 = 1 - beta1 ** self.steps[kind]
        correction2 = 1 - beta2 ** sum(self.steps.values())
        with torch.no_grad():
            for name, first in self.first[kind].items():
                grad = max(min(grads[name], self.grad_clip), -self.grad_clip)
                self.first[kind][name] = first = first * beta1 + grad * (1 - beta1)
                self.second[name] = self.second[name] * beta2 + grad * grad * (1 - beta2)
                denominator = math.sqrt(self.second[name] / correction2) + self.eps
                value = scales[name].item() - self.lr / correction1 * first / denominator
                scales[name].fill_(max(value, self.floors[name]))


def gradinit_rescale(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    steps: int = 180,
    lr: float = 1e-2,
    eta: float = 0.1,
    gamma: float = 1.0,
    min_scale: float = 0.01,
    grad_clip: float = 1.0,
    normalize_grad: bool = True,
    include_layernorm: bool = True,
    include_bias: bool = True,
    include_embeddings: bool = False,
) -> GradInitReport:
    """Learn one scale per parameter tensor with GradInit and bake it into the weights (see module docstring).

    Args:
        batches: a list or DataLoader (restarted when spent) or an iterator with at least 1 + 3 * steps batches.
            The first batch is held out to measure the loss before and after.
        loss_fn: `loss_fn(model, batch) -> loss`; it must call `model(...)`. Default: the model's `.loss`.
        masks: module name -> mask; default: the masks attached to the model. Masked tensors keep their zeros.
        steps, lr, eta, gamma, min_scale, grad_clip, normalize_grad: GradInit's settings (the ToST README's command:
            180 iterations, lr 1e-2, eta 0.1, gamma 1, min scale 0.01, per-dimension clip 1, normalised gradient).
        include_layernorm / include_bias / include_embeddings: which tensors besides weights get a scale.

    Runs with dropout off and batch norms on batch statistics (their running statistics untouched).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
    for name, value in (("lr", lr), ("eta", eta), ("gamma", gamma), ("min_scale", min_scale), ("grad_clip", grad_clip)):
        check_positive(name, value)

    loss_module = _LossModule(model, loss_fn or default_loss_fn)
    parameters = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    masks = get_masks(model) if masks is None else masks
    parameter_masks = {}
    for module_name, mask in masks.items():
        parameter_name = f"{module_name}.weight" if module_name else "weight"
        if parameter_name not in parameters:
            raise ValueError(f"`masks` names `{module_name}`, which has no trainable weight in the model.")
        parameter_masks[parameter_name] = mask.to(parameters[parameter_name].device, torch.bool)
    base = {
        name: parameter.detach().masked_fill(~parameter_masks[name], 0)
        if name in parameter_masks
        else parameter.detach()
        for name, parameter in parameters.items()
    }
    scaled = scaled_parameter_names(model, include_layernorm, include_bias, include_embeddings)
    biases = set(scaled_parameter_names(model, False, True, False)) - set(scaled_parameter_names(model, False, False))
    # float64 scalars: exact clamping at the floor; a 0-dim tensor does not change the weights' dtype.
    scales = {
        name: torch.ones((), dtype=torch.float64, device=base[name].device, requires_grad=True) for name in scaled
    }
    optimizer = RescaleAdam(
        floors={name: 0.0 if name in biases else min_scale for name in scaled},
        zero_at_start={name for name in scaled if not bool(base[name].any())},
        lr=lr, grad_clip=grad_clip,
    )
    cycler = BatchCycler(batches)

    def loss_at(values: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return functional_call(loss_module, {f"model.{name}": value for name, value in values.items()}, (batch,))

    history: list[dict[str, Any]] = []
    with sdpa_kernel(SDPBackend.MATH), batch_statistics_without_running_update(model):
        held_out = cycler.next()
        with torch.no_grad():
            loss_before = float(loss_at(base, held_out))
        for step in range(steps):
            values = {
                name: scales[name] * tensor if name in scales else tensor.detach().requires_grad_(True)
                for name, tensor in base.items()
            }
            first_half = cycler.next()
            loss = loss_at(values, concat_batches(first_half, cycler.next()))
            grads = torch.autograd.grad(loss, list(values.values()), create_graph=True, allow_unused=True)
            grads = {
                name: (torch.zeros_like(values[name]) if grad is None else grad)
                for name, grad in zip(values, grads)
            }
            for name, mask in parameter_masks.items():
                grads[name] = grads[name].masked_fill(~mask, 0)  # the look-ahead must not grow pruned weights
            grad_norm = torch.sqrt(sum(grad.pow(2).sum() for grad in grads.values()))
            if grad_norm.item() > gamma:
                objective, kind = grad_norm, "grad_norm"
            else:
                step_size = eta / (grad_norm + 1e-12) if normalize_grad else eta
                lookahead = {name: values[name] - step_size * grads[name] for name in values}
                # the first half again with a fresh one (the ToST code's default, `batch_no_overlap=False`)
                objective = loss_at(lookahead, concat_batches(first_half, cycler.next())) / eta
                kind = "lookahead"
            if not objective.requires_grad:
                raise RuntimeError("GradInit's objective does not depend on the scales; check `loss_fn`.")
            scale_grads = torch.autograd.grad(objective, list(scales.values()), allow_unused=True)
            optimizer.step(scales, {name: 0.0 if grad is None else grad.item()
                                    for name, grad in zip(scales, scale_grads)}, kind)
            history.append(
                {
                    "step": step,
                    "objective": kind,
                    "value": objective.item(),
                    "loss": loss.item(),
                    "grad_norm": grad_norm.item(),
                }
            )

        with torch.no_grad():
            for name, parameter in parameters.items():
                if name in scales:
                    parameter.copy_(scales[name] * base[name])
                elif name in parameter_masks:
                    parameter.masked_fill_(~parameter_masks[name], 0)
            loss_after = float(loss_at({name: parameter.detach() for name, parameter in parameters.items()}, held_out))
    report = GradInitReport(
        scales={name: scale.item() for name, scale in scales.items()},
        loss_before=loss_before,
        loss_after=loss_after,
        steps=steps,
        history=history,
    )
    logger.info("GradInit: %d steps, held-out loss %.4f -> %.4f, scales %.3f to %.3f", steps, loss_before, loss_after,
                min(report.scales.values(), default=1.0), max(report.scales.values(), default=1.0))
    return report
