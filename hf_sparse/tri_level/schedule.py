"""Levels 2 and 3 over a run: the token and attention keep ratios go from 1 (dense) to the model's own, on a cosine
snapped to a grid.

The final ratios are the model's (`config.token_keep_ratio`, `config.attention_keep_ratio`: saved with it and used
for evaluation, as in the paper); the schedule only says how fast they are reached.

The grid, and why (torch.compile): the ratios in force are Python floats that the model reads in `forward`, so
`torch.compile` specialises on them: every new value is a new graph, and after `torch._dynamo.config.recompile_limit`
(8 by default) graphs of one frame, the rest of the run silently runs eager. A ratio that changed every step (the plain
cosine) would recompile every step. So the cosine's density weight (1 = dense, 0 = the final ratios) is rounded to
the nearest of `ratio_levels` evenly spaced values: with the default 9 levels, the ratios move in eighths of the way
from 1 to the final ratio,

    ratio = final + (1 - final) * w,   w in {1, 7/8, 6/8, ..., 1/8, 0}

(for a final token keep ratio of 0.5: 1.0, 0.9375, 0.875, ..., 0.5625, 0.5), token and attention together. A whole run
goes through at most `ratio_levels` (token, attention) pairs, so a compiled model builds at most `ratio_levels`
training graphs, plus the evaluation graph (final ratios, eval mode) and any graph that a change of batch size or
inputs asks for. When `torch_compile` is on, `KeepRatioScheduleCallback` raises dynamo's recompile limit to
`ratio_levels` + 8 (torch's default budget kept for everything that is not the schedule) so that none of them falls
back to eager, and puts the previous limit back when training ends (the setting is global to the process; graphs
already compiled keep running under a lower limit, only new ones count against it). `ratio_levels=None` gives the
continuous cosine (a new ratio every step: do not compile with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import TrainerCallback

from ..logging_utils import get_logger
from ..validation import check_fraction, check_int

logger = get_logger(__name__)

DEFAULT_RATIO_LEVELS = 9  # the ratios move in eighths of the way from 1 to the final ratio
OTHER_COMPILED_GRAPHS = 8  # torch's default recompile limit, kept for what is not the schedule (evaluation, ...)


@dataclass(frozen=True)
class KeepRatioSchedule:
    """1 during the warm-up (`warmup_fraction` of training), then a cosine from 1 to the final ratio over
    `decay_fraction`, then the final ratio (the paper: 10 and 100 of 300 epochs). The cosine is snapped to
    `ratio_levels` evenly spaced ratios, 1 and the final ratio included (see the module docstring: a bounded number
    of `torch.compile` graphs); `None` leaves it continuous."""

    warmup_fraction: float = 10 / 300
    decay_fraction: float = 100 / 300
    ratio_levels: int | None = DEFAULT_RATIO_LEVELS

    def __post_init__(self) -> None:
        check_fraction("sparsity_warmup_fraction", self.warmup_fraction)
        check_fraction("sparsity_decay_fraction", self.decay_fraction, high_inclusive=True)
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise ValueError(
                "`sparsity_warmup_fraction` + `sparsity_decay_fraction` must be <= 1, got "
                f"{self.warmup_fraction} + {self.decay_fraction}."
            )
        if self.ratio_levels is not None:
            check_int("ratio_levels", self.ratio_levels, minimum=2)

    def cosine_weight(self, progress: float) -> float:
        """The unsnapped density weight at `progress` in [0, 1] of training: 1 = dense, 0 = the final ratio."""
        warmup, decay = self.warmup_fraction, self.decay_fraction
        if progress < warmup:
            return 1.0
        if decay > 0 and progress < warmup + decay:
            return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / decay))
        return 0.0

    def density_weight(self, progress: float) -> float:
        """The density weight in force at `progress`: the cosine's, rounded to the nearest grid level."""
        weight = self.cosine_weight(progress)
        if self.ratio_levels is None:
            return weight
        steps = self.ratio_levels - 1
        return math.floor(weight * steps + 0.5) / steps

    def ratios(self, progress: float, token_keep_ratio: float, attention_keep_ratio: float) -> tuple[float, float]:
        """(token, attention) keep ratios in force at `progress`, for the given final ratios."""
        weight = self.density_weight(progress)
        return _interpolate(token_keep_ratio, weight), _interpolate(attention_keep_ratio, weight)

    def grid(self, token_keep_ratio: float, attention_keep_ratio: float) -> list[tuple[float, float]]:
        """Every (token, attention) pair a run can go through, dense first (empty for a continuous schedule)."""
        if self.ratio_levels is None:
            return []
        steps = self.ratio_levels - 1
        weights = [level / steps for level in range(steps, -1, -1)]
        return [(_interpolate(token_keep_ratio, w), _interpolate(attention_keep_ratio, w)) for w in weights]


def _interpolate(final_ratio: float, weight: float) -> float:
    # Written so that the ends are exact (1.0 and the final ratio themselves): the same level is always the same float,
    # which is what torch.compile's guards compare.
    return final_ratio * (1.0 - weight) + weight


def _recompile_limit_name() -> str:
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def fit_recompile_limit(num_graphs: int) -> int:
    """Raise `torch._dynamo.config.recompile_limit` (`cache_size_limit` before torch 2.7) to at least `num_graphs`
    (never lower it); returns the limit in force."""
    import torch._dynamo

    config, name = torch._dynamo.config, _recompile_limit_name()
    if getattr(config, name) < num_graphs:
        logger.info("KeepRatioScheduleCallback: torch._dynamo.config.%s raised from %d to %d for the keep-ratio grid.",
                    name, getattr(config, name), num_graphs)
        setattr(config, name, num_graphs)
    return getattr(config, name)


class KeepRatioScheduleCallback(TrainerCallback):
    """Sets the model's keep ratios from the schedule at every optimizer step (`model.set_sparsity`), and back to
    the model's own when training ends. With `torch_compile`, fits dynamo's recompile limit to the schedule's grid
    for the run and restores the previous limit when training ends."""

    def __init__(self, schedule: KeepRatioSchedule) -> None:
        self.schedule = schedule
        # (limit before the raise, limit set): restored at train end unless someone changed it in between
        self._raised_recompile_limit: tuple[int, int] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not getattr(args, "torch_compile", False):
            return
        if self.schedule.ratio_levels is None:
            logger.warning("KeepRatioScheduleCallback: a continuous keep-ratio schedule under torch.compile recompiles "
                           "the model at every step; use a grid (`ratio_levels`).")
            return
        import torch._dynamo

        previous = getattr(torch._dynamo.config, _recompile_limit_name())
        fitted = fit_recompile_limit(self.schedule.ratio_levels + OTHER_COMPILED_GRAPHS)
        if fitted != previous and self._raised_recompile_limit is None:
            self._raised_recompile_limit = (previous, fitted)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        progress = state.global_step / max(1, state.max_steps)
        model.set_sparsity(*self.schedule.ratios(progress, model.config.token_keep_ratio,
                                                 model.config.attention_keep_ratio))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.reset_sparsity()
        self._restore_recompile_limit()

    def _restore_recompile_limit(self) -> None:
        # The limit is global to the process: leave it as the run found it. A value changed during the run by someone
        # else is theirs and stays.
        if self._raised_recompile_limit is None:
            return
        import torch._dynamo

        previous, fitted = self._raised_recompile_limit
        self._raised_recompile_limit = None
        name = _recompile_limit_name()
        if getattr(torch._dynamo.config, name) == fitted:
            setattr(torch._dynamo.config, name, previous)
