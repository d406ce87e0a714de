"""`GhostCallback`: ghost soft neurons and skip connections over the early part of a `Trainer` run."""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...logging_utils import get_logger
from .schedule import GhostSchedule
from .skip_connections import ConvGhostBranches, attach_ghost_skips
from .soft_neurons import attach_ghost_activations

logger = get_logger(__name__)

GHOST_BRANCHES_FILENAME = "ghost_skip_branches.safetensors"
"""Written beside a checkpoint taken during the ghost phase: the CNN ghost branches' weights and batch-norm statistics
(their optimizer state is in the Trainer's `optimizer.pt`, as parameter groups of their own)."""


class GhostCallback(TrainerCallback):
    """Attaches the ghosts when training begins, anneals them at every optimizer step and removes them once
    `end_fraction` of the steps are done (or when training ends): the model is then back to its own architecture,
    `state_dict` keys and parameter count.

    Progress is a function of the global step, so a resumed run continues the schedule exactly (and attaches
    nothing when it resumes after the ghost phase).

    A CNN's ghost skips are trainable branches (`ConvGhostBranches`) outside the model. `add_branches_to_optimizer`,
    called by `ToSTTrainer.create_optimizer`, builds them and gives them two parameter groups of the run's optimizer
    before the Trainer creates the learning-rate schedule and loads a checkpoint's optimizer state, so they follow the
    schedule and resume exactly (their weights from `ghost_skip_branches.safetensors` in the checkpoint named by
    `resume_checkpoint`). With a plain `Trainer` they are built in `on_train_begin` and their groups follow the first
    group's learning rate. Before each optimizer step their gradients are averaged across ranks (they are outside the
    DDP wrapper) and clipped to `max_grad_norm` on their own, and after it they are zeroed (the Trainer zeroes only the
    model's); when the branches are deleted their groups and optimizer state go with them.

    Attributes:
        progress: the ghost progress s in [0, 1] used by the current step (None before training).
        removed_at_step: the global step at which the ghosts were removed (None while present or unused).
        resume_checkpoint: the checkpoint a run resumes from (set by `ToSTTrainer`), for the branches' weights.
    """

    def __init__(
        self,
        *,
        soft_neurons: bool = True,
        skip_connections: bool = True,
        end_fraction: float = 0.1,
        activation_lambda: float = 0.5,
        skip_alpha: float = 1.0,
        skip_schedule: str = "linear",
    ) -> None:
        self.soft_neurons = soft_neurons
        self.skip_connections = skip_connections
        self.schedule = GhostSchedule(end_fraction)
        self.activation_lambda = activation_lambda
        self.skip_alpha = skip_alpha
        self.skip_schedule = skip_schedule
        self.progress: float | None = None
        self.removed_at_step: int | None = None
        self.resume_checkpoint: str | None = None
        self._handles: list[Any] = []
        self._skips: Any = None  # the skip handle, once attached (built early when it has parameters)
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def enabled(self) -> bool:
        return self.soft_neurons or self.skip_connections

    @property
    def description(self) -> str:
        """Which ghosts this callback attaches, in words ("ghost soft neurons and ghost skip connections")."""
        kinds = [kind for kind, on in (("ghost soft neurons", self.soft_neurons),
                                       ("ghost skip connections", self.skip_connections)) if on]
        return " and ".join(kinds) or "no ghosts"

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def branches(self) -> ConvGhostBranches | None:
        """The CNN ghost branches while attached (None otherwise)."""
        return self._skips if isinstance(self._skips, ConvGhostBranches) else None

    @staticmethod
    def _training_progress(state) -> float:
        return state.global_step / max(1, state.max_steps)

    # --- the branches' parameters in the run's optimizer ----------------------------------------------------------

    def add_branches_to_optimizer(self, model, optimizer: torch.optim.Optimizer, state, args) -> None:
        """Build the skips now if they have parameters (a CNN within its ghost phase) and add those to `optimizer`;
        on a resume, load the branches' weights from `resume_checkpoint`. Called once the optimizer exists and before
        the schedule is made and a checkpoint's optimizer state is loaded."""
        if not self.skip_connections or self._skips is not None or self.schedule(self._training_progress(state)) >= 1:
            return
        skips = self._attach_skips(model, self.schedule(self._training_progress(state)))
        if not isinstance(skips, ConvGhostBranches):
            skips.remove()  # parameter-free: attached in `on_train_begin` with the soft neurons
            return
        self._skips = skips
        if self.resume_checkpoint is not None:
            path = os.path.join(self.resume_checkpoint, GHOST_BRANCHES_FILENAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Cannot resume within the ghost phase from {self.resume_checkpoint}: it has no "
                    f"{GHOST_BRANCHES_FILENAME} (the ghost skip branches). Resume from a checkpoint written by this "
                    "version of ToSTTrainer, or after the ghost phase."
                )
            skips.branches.load_state_dict(load_file(path, device=str(next(skips.parameters()).device)))
        self._add_groups(optimizer, args.weight_decay)

    def _attach_skips(self, model, progress: float):
        return attach_ghost_skips(model, alpha_0=self.skip_alpha, schedule=self.skip_schedule, progress=progress)

    def _add_groups(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        for group in self.branches.parameter_groups(weight_decay):
            optimizer.add_param_group(group)  # takes the optimizer's defaults (lr, betas, ...) for the rest
        self._optimizer = optimizer

    def _branch_group_positions(self) -> list[int]:
        # found by their parameters: accelerate's `prepare` reloads the optimizer's state dict (new group dicts)
        ours = {id(parameter) for parameter in self.branches.parameters()} if self.branches is not None else set()
        return [i for i, group in enumerate(self._optimizer.param_groups)
                if any(id(parameter) in ours for parameter in group["params"])]

    def _drop_groups(self, lr_scheduler=None) -> None:
        """Remove the branches' groups and their state from the optimizer (and the schedule's entries for them)."""
        if self._optimizer is None:
            return
        groups = self._optimizer.param_groups
        positions = self._branch_group_positions()
        count = len(groups)
        for position in positions:
            for parameter in groups[position]["params"]:
                self._optimizer.state.pop(parameter, None)
        groups[:] = [group for i, group in enumerate(groups) if i not in positions]
        for name in ("base_lrs", "lr_lambdas", "_last_lr", "min_lrs"):  # LambdaLR & co. keep one entry per group
            values = getattr(lr_scheduler, name, None)
            if isinstance(values, list) and len(values) == count:
                setattr(lr_scheduler, name, [value for i, value in enumerate(values) if i not in positions])
        self._optimizer = None

    # --- events ---------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.enabled:
            return
        progress = self.schedule(self._training_progress(state))
        self.progress = progress
        if progress >= 1.0:
            return
        handles = []
        try:
            if self.soft_neurons:
                handles.append(attach_ghost_activations(model, lambda_0=self.activation_lambda, progress=progress))
            if self.skip_connections:
                if self._skips is None:
                    self._skips = self._attach_skips(model, progress)
                    if isinstance(self._skips, ConvGhostBranches) and optimizer is not None:
                        self._add_groups(optimizer, args.weight_decay)  # a plain Trainer: after its schedule
                handles.append(self._skips)
        except ValueError as error:
            for handle in handles:
                handle.remove()
            raise ValueError(f"`ghost_soft_neurons`/`ghost_skip_connections` cannot be attached: {error}") from error
        self._handles = handles
        if state.is_world_process_zero:
            logger.info("%s attached at step %d (progress %.3f); removed after %d%% of the %d steps.",
                        self.description.capitalize(), state.global_step, progress,
                        round(100 * self.schedule.end_fraction), state.max_steps)

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if not self._handles:
            return
        training_progress = self._training_progress(state)
        self.progress = self.schedule(training_progress)
        if self.schedule.update(training_progress, *self._handles):
            self._remove(lr_scheduler)
            self.removed_at_step = state.global_step
            if state.is_world_process_zero:
                logger.info("%s removed at step %d: the model is back to its own architecture.",
                            self.description.capitalize(), state.global_step)
        elif self._optimizer is not None:
            # the run's learning rate (a schedule made before the groups existed does not drive them)
            for position in self._branch_group_positions():
                self._optimizer.param_groups[position]["lr"] = self._optimizer.param_groups[0]["lr"]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        branches = self.branches
        if branches is None or self._optimizer is None:
            return
        parameters = [p for p in branches.parameters() if p.grad is not None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
            if world_size > 1:  # outside the DDP wrapper: average their gradients as DDP does the model's
                for parameter in parameters:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad.div_(world_size)
        if args.max_grad_norm and args.max_grad_norm > 0 and parameters:
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.branches is not None:  # the Trainer zeroes the model's gradients only
            for parameter in self.branches.parameters():
                parameter.grad = None

    def on_save(self, args, state, control, **kwargs):
        branches = self.branches
        if branches is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            tensors = {name: tensor.detach().cpu().contiguous()
                       for name, tensor in branches.branches.state_dict().items()}
            save_file(tensors, os.path.join(folder, GHOST_BRANCHES_FILENAME))

    def on_train_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if not self._handles:
            return
        self._remove(lr_scheduler)
        if self.progress is not None and self.progress >= 1.0:
            self.removed_at_step = state.global_step

    def _remove(self, lr_scheduler=None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._drop_groups(lr_scheduler)
        self._skips = None
