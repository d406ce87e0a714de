"""`GradientFlowCallback`: how much gradient reaches the weights a mask keeps, the quantity ToST's ghosts and rescaled
initialisation are meant to raise (the paper's "gradient flow"), measured in the run itself."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .masks import get_masks, masked_modules


class GradientFlowCallback(TrainerCallback):
    """Records, for each of the first `steps` optimizer steps, the L2 norm of the gradient on the kept weights of the
    masked layers, summed over the step's micro-batches and taken before the Trainer's clipping (the gradient the
    backward pass delivered, whatever `max_grad_norm` then does to it). With `stop_after=True` training stops after
    them: a diagnostic run whose first steps are exactly those of the full run (same schedule, ghosts, init).

    After training, `norms` holds the per-step norms and `mean` their mean (None before a step)."""

    def __init__(self, steps: int = 20, stop_after: bool = False) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`steps` must be a positive integer, got {steps!r}.")
        self.steps = steps
        self.stop_after = stop_after
        self.norms: list[float] = []
        self._squares: dict[str, torch.Tensor] = {}
        self._handles: list = []

    @property
    def mean(self) -> float | None:
        return sum(self.norms) / len(self.norms) if self.norms else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._handles or model is None:
            return
        modules, masks = masked_modules(model), get_masks(model)
        if not masks:
            raise ValueError("GradientFlowCallback needs a masked model: no layer carries a mask.")
        for name, kept in masks.items():
            self._handles.append(modules[name].weight.register_post_accumulate_grad_hook(self._recorder(name, kept)))

    def _recorder(self, name: str, kept: torch.Tensor):
        def record(weight: torch.Tensor) -> None:
            # the accumulated gradient so far: the last micro-batch of the step leaves the step's total (kept as a
            # tensor: one device sync a step, in on_pre_optimizer_step, not one a layer)
            self._squares[name] = weight.grad.detach().masked_select(kept.to(weight.grad.device)).pow(2).sum()
        return record

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._handles and self._squares:
            self.norms.append(torch.stack(list(self._squares.values())).sum().sqrt().item())
            self._squares.clear()
        if len(self.norms) >= self.steps:
            self._remove_hooks()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_after and len(self.norms) >= self.steps:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
