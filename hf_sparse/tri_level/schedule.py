"""Levels 2 and 3 over a run: the token and attention keep ratios go from 1 (dense) to the model's own, on a cosine.

The final ratios are the model's (`config.token_keep_ratio`, `config.attention_keep_ratio`: saved with it and used
for evaluation, as in the paper); the schedule only says how fast they are reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import TrainerCallback

from ..validation import check_fraction


@dataclass(frozen=True)
class KeepRatioSchedule:
    """1 during the warm-up (`warmup_fraction` of training), then a cosine from 1 to the final ratio over
    `decay_fraction`, then the final ratio (the paper: 10 and 100 of 300 epochs)."""

    warmup_fraction: float = 10 / 300
    decay_fraction: float = 100 / 300

    def __post_init__(self) -> None:
        check_fraction("sparsity_warmup_fraction", self.warmup_fraction)
        check_fraction("sparsity_decay_fraction", self.decay_fraction, high_inclusive=True)
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise ValueError(
                "`sparsity_warmup_fraction` + `sparsity_decay_fraction` must be <= 1, got "
                f"{self.warmup_fraction} + {self.decay_fraction}."
            )

    def density_weight(self, progress: float) -> float:
        """How far from the final ratio at `progress` in [0, 1] of training: 1 = dense, 0 = the final ratio."""
        warmup, decay = self.warmup_fraction, self.decay_fraction
        if progress < warmup:
            return 1.0
        if decay > 0 and progress < warmup + decay:
            return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / decay))
        return 0.0

    def ratios(self, progress: float, token_keep_ratio: float, attention_keep_ratio: float) -> tuple[float, float]:
        """(token, attention) keep ratios in force at `progress`, for the given final ratios."""
        weight = self.density_weight(progress)
        return (
            token_keep_ratio + (1.0 - token_keep_ratio) * weight,
            attention_keep_ratio + (1.0 - attention_keep_ratio) * weight,
        )


class KeepRatioScheduleCallback(TrainerCallback):
    """Sets the model's keep ratios from the schedule at every optimizer step (`model.set_sparsity`), and back to
    the model's own when training ends."""

    def __init__(self, schedule: KeepRatioSchedule) -> None:
        self.schedule = schedule

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        progress = state.global_step / max(1, state.max_steps)
        model.set_sparsity(*self.schedule.ratios(progress, model.config.token_keep_ratio,
                                                 model.config.attention_keep_ratio))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.reset_sparsity()
