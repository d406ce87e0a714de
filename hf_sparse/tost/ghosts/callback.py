"""`GhostCallback`: ghost soft neurons and skip connections over the early part of a `Trainer` run."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ...logging_utils import get_logger
from .schedule import GhostSchedule
from .skip_connections import attach_ghost_skips
from .soft_neurons import attach_ghost_activations

logger = get_logger(__name__)


class GhostCallback(TrainerCallback):
    """Attaches the ghosts when training begins, anneals them at every optimizer step and removes them once
    `end_fraction` of the steps are done (or when training ends): the model is then back to its own architecture,
    `state_dict` keys and parameter count.

    Progress is a function of the global step, so a resumed run continues the schedule exactly (and attaches
    nothing when it resumes after the ghost phase).

    Attributes:
        progress: the ghost progress s in [0, 1] used by the current step (None before training).
        removed_at_step: the global step at which the ghosts were removed (None while present or unused).
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
        self._handles: list[Any] = []

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

    @staticmethod
    def _training_progress(state) -> float:
        return state.global_step / max(1, state.max_steps)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
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
                handles.append(
                    attach_ghost_skips(model, alpha_0=self.skip_alpha, schedule=self.skip_schedule, progress=progress)
                )
        except ValueError as error:
            for handle in handles:
                handle.remove()
            raise ValueError(f"`ghost_soft_neurons`/`ghost_skip_connections` cannot be attached: {error}") from error
        self._handles = handles
        if state.is_world_process_zero:
            logger.info("%s attached at step %d (progress %.3f); removed after %d%% of the %d steps.",
                        self.description.capitalize(), state.global_step, progress,
                        round(100 * self.schedule.end_fraction), state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        if not self._handles:
            return
        training_progress = self._training_progress(state)
        self.progress = self.schedule(training_progress)
        if self.schedule.update(training_progress, *self._handles):
            self._handles = []
            self.removed_at_step = state.global_step
            if state.is_world_process_zero:
                logger.info("%s removed at step %d: the model is back to its own architecture.",
                            self.description.capitalize(), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.progress is not None and self.progress >= 1.0:
            self.removed_at_step = state.global_step
