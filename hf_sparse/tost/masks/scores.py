"""Importance scores of prunable weights and the thresholding that turns scores into masks.

Every score function returns `{module name: tensor shaped like the weight}` where a HIGHER score means KEEP;
`masks_from_scores` keeps the top-k. Scores are computed in the model's current train/eval mode and never touch
`.grad`; second-order scores (GraSP) run under the MATH SDPA kernel, the only CPU SDPA kernel with a double
backward (eager attention works as is).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...validation import check_choice, check_fraction
from ..batches import LossFn, call_model, classification_loss, default_loss_fn, model_logits, take_batches
from .config import DEFAULT_PRUNABLE_PATTERNS, MASK_SCOPES
from .model import find_prunable_layers


ScoreDict = dict[str, torch.Tensor]


def magnitude_scores(model: nn.Module, patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS) -> ScoreDict:
    """|w|."""
    linears = find_prunable_layers(model, patterns)
    return {name: module.weight.detach().abs().float() for name, module in linears.items()}


def random_scores(
    model: nn.Module,
    patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS,
    generator: torch.Generator | None = None,
) -> ScoreDict:
    """Uniform random scores (drawn on CPU so a seed gives the same mask on any device)."""
    return {
        name: torch.rand(module.weight.shape, generator=generator).to(module.weight.device)
        for name, module in find_prunable_layers(model, patterns).items()
    }


def _gradients(loss: torch.Tensor, weights: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(weight) if grad is None else grad for grad, weight in zip(grads, weights)]


def snip_scores(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    num_batches: int = 1,
    patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS,
) -> ScoreDict:
    """SNIP connection sensitivity |dL/dm| at m = 1, i.e. |g * w|.

    The gradient g is summed over the first `num_batches` batches before taking the absolute value (the same as
    one larger batch). `loss_fn(model, batch)` defaults to the model's `.loss` (dict batches with `labels`) or
    cross-entropy on an `(inputs, labels)` pair.
    """
    linears = find_prunable_layers(model, patterns)
    weights = [module.weight for module in linears.values()]
    loss_fn = loss_fn or default_loss_fn
    summed = [torch.zeros_like(weight) for weight in weights]
    for batch in take_batches(batches, num_batches):
        for total, grad in zip(summed, _gradients(loss_fn(model, batch), weights)):
            total += grad.detach()
    return {name: (grad * weight.detach()).abs().float() for name, grad, weight in zip(linears, summed, weights)}


def grasp_scores(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    num_batches: int = 1,
    temperature: float = 200.0,
    patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS,
) -> ScoreDict:
    """GraSP keep-score `w * (H g)` (higher = keep).

    Sign convention: GraSP (Wang et al. 2020) scores each weight by S(-w) = -w * (H g), the first-order change of
    the gradient norm when w is removed, and removes the weights with the LARGEST S (GraSP's code takes the top-k
    of S as the weights to prune; the SynFlow authors' re-implementation keeps the top-k of w * Hg: the same
    rule). Here every score is a keep-score, so this returns -S = w * (H g) and the largest values are kept.

    g and H g are over the prunable weights only; g is summed over the batches and H g is accumulated over the
    same batches by a Hessian-vector product. The default loss is cross-entropy of `logits / temperature`
    (GraSP's T = 200); a custom `loss_fn(model, batch)` is used as given and must apply the temperature itself.
    """
    linears = find_prunable_layers(model, patterns)
    weights = [module.weight for module in linears.values()]
    loss_fn = loss_fn or partial(classification_loss, temperature=temperature)
    batches = take_batches(batches, num_batches)
    with sdpa_kernel(SDPBackend.MATH):
        gradient = [torch.zeros_like(weight) for weight in weights]
        for batch in batches:
            for total, grad in zip(gradient, _gradients(loss_fn(model, batch), weights)):
                total += grad.detach()
        hessian_gradient = [torch.zeros_like(weight) for weight in weights]
        for batch in batches:
            grads = _gradients(loss_fn(model, batch), weights, create_graph=True)
            inner = sum((grad * stopped).sum() for grad, stopped in zip(grads, gradient))
            if not inner.requires_grad:  # the loss is linear in the weights: H g = 0
                continue
            for total, part in zip(hessian_gradient, _gradients(inner, weights)):
                total += part.detach()
    return {
        name: (weight.detach() * hg).float() for name, weight, hg in zip(linears, weights, hessian_gradient)
    }


def _ones_like_inputs(inputs: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """SynFlow's input: floating tensors become all-ones with batch size 1; other tensors keep their first row."""
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point():
            return torch.ones((1, *inputs.shape[1:]), dtype=dtype, device=device)
        return inputs[:1].to(device)
    if isinstance(inputs, Mapping):
        return {key: _ones_like_inputs(value, dtype, device) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_ones_like_inputs(value, dtype, device) for value in inputs)
    return inputs


class _LinearisedCopy:
    """SynFlow's network: a deep copy with |theta| for every parameter, in eval mode, in `dtype` where possible."""

    def __init__(self, model: nn.Module, names: Sequence[str], example_inputs: Any, dtype: torch.dtype) -> None:
        self.network = copy.deepcopy(model).eval().to(dtype)
        modules = dict(self.network.named_modules())
        with torch.no_grad():
            for parameter in self.network.parameters():
                parameter.abs_()
                parameter.requires_grad_(False)
        self.weights = {name: modules[name].weight for name in names}
        for weight in self.weights.values():
            weight.requires_grad_(True)
        self.base = {name: weight.detach().clone() for name, weight in self.weights.items()}
        device = next(iter(self.weights.values())).device
        self.inputs = _ones_like_inputs(example_inputs, dtype, device)

    def scores(self, masks: Mapping[str, torch.Tensor] | None = None) -> ScoreDict:
        with torch.no_grad():
            for name, weight in self.weights.items():
                weight.copy_(self.base[name] if masks is None else self.base[name] * masks[name].to(weight.device))
        objective = model_logits(call_model(self.network, self.inputs)).sum()
        grads = _gradients(objective, list(self.weights.values()))
        return {name: (grad * weight).detach().abs() for (name, weight), grad in zip(self.weights.items(), grads)}


def _linearised_copy(
    model: nn.Module, names: Sequence[str], example_inputs: Any, dtype: torch.dtype
) -> _LinearisedCopy:
    try:
        network = _LinearisedCopy(model, names, example_inputs, dtype)
        network.scores()  # fail here, not mid-pruning, when a layer has no kernel for `dtype`
        return network
    except (RuntimeError, TypeError) as error:
        if dtype == torch.float32:
            raise
        warnings.warn(f"SynFlow in {dtype} failed ({error}); falling back to float32.", stacklevel=3)
        return _LinearisedCopy(model, names, example_inputs, torch.float32)


def synflow_scores(
    model: nn.Module,
    example_inputs: Any,
    masks: Mapping[str, torch.Tensor] | None = None,
    patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS,
    dtype: torch.dtype = torch.float64,
) -> ScoreDict:
    """One round of SynFlow: |w * dR/dw| with R the summed output of the |theta| network on an all-ones input.

    `example_inputs` is a batch of inputs (a tensor or a dict of keyword inputs, no labels); only its shapes are
    used. The model itself is untouched (a deep copy is scored, in float64 where its layers allow).
    With LayerNorm and softmax (ViTs) R is no longer a path-norm polynomial of the weights, so SynFlow's
    conservation argument does not hold there: treat it as a data-free heuristic.
    """
    names = list(find_prunable_layers(model, patterns))
    return _linearised_copy(model, names, example_inputs, dtype).scores(masks)


def synflow_masks(
    model: nn.Module,
    sparsity: float,
    example_inputs: Any,
    rounds: int = 100,
    scope: str = "global",
    patterns: str | Sequence[str] = DEFAULT_PRUNABLE_PATTERNS,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Iterative SynFlow: `rounds` score-and-prune rounds, density (1 - sparsity) ** (r / rounds) after round r."""
    check_fraction("sparsity", sparsity)
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive integer, got {rounds!r}.")
    linears = find_prunable_layers(model, patterns)
    network = _linearised_copy(model, list(linears), example_inputs, dtype)
    masks: dict[str, torch.Tensor] | None = None
    for round_index in range(1, rounds + 1):
        round_sparsity = 1.0 - (1.0 - sparsity) ** (round_index / rounds)
        masks = masks_from_scores(network.scores(masks), round_sparsity, scope, current_masks=masks)
    return {name: mask.to(linears[name].weight.device) for name, mask in masks.items()}


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    current_masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep the highest scores so that exactly round((1 - sparsity) * n) weights survive.

    `scope="global"` ranks all weights together (n = all prunable weights); `"layer"` ranks each layer on its own
    (n = that layer's weights). Ties are broken by `torch.topk`, so the count is exact. Weights already pruned in
    `current_masks` are never revived (their score is -inf); NaN scores rank last.
    """
    check_fraction("sparsity", sparsity)
    check_choice("scope", scope, MASK_SCOPES)
    if not scores:
        raise ValueError("`scores` is empty.")
    dtype = torch.float64 if any(score.dtype == torch.float64 for score in scores.values()) else torch.float32
    prepared = {}
    for name, score in scores.items():
        score = torch.nan_to_num(score.detach().to(dtype), nan=float("-inf"))
        if current_masks is not None:
            score = score.masked_fill(~current_masks[name].to(score.device, torch.bool), float("-inf"))
        prepared[name] = score
    if scope == "layer":
        return {name: _keep_top(score, sparsity) for name, score in prepared.items()}
    device = next(iter(prepared.values())).device
    flat = torch.cat([score.flatten().to(device) for score in prepared.values()])
    keep_flat = _keep_top(flat, sparsity)
    masks, offset = {}, 0
    for name, score in prepared.items():
        masks[name] = keep_flat[offset : offset + score.numel()].view(score.shape).to(score.device)
        offset += score.numel()
    return masks


def _keep_top(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = round((1.0 - sparsity) * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if keep > 0:
        mask[torch.topk(score.flatten(), keep, sorted=False).indices] = True
    return mask.view(score.shape)
