"""When the ghosts fade: training progress p -> ghost progress s, and the point where they are deleted."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

from ...validation import check_fraction


class GhostHandle(Protocol):
    def set_progress(self, progress: float) -> None: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class GhostSchedule:
    """s = min(1, p / end_fraction); the ghosts are removed once p >= end_fraction (T_g in the ToST digest).

    `end_fraction` in (0, 1] is the fraction of training after which the model is back to its own architecture.
    """

    end_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_fraction("end_fraction", self.end_fraction, low_inclusive=False, high_inclusive=True)

    def progress(self, training_progress: float) -> float:
        """The ghost progress s for a training progress p (p > 1 is clamped: step counts may overshoot)."""
        valid = isinstance(training_progress, numbers.Real) and math.isfinite(training_progress)
        if not valid or training_progress < 0:
            raise ValueError(f"`training_progress` must be a number >= 0, got {training_progress!r}.")
        return min(1.0, training_progress / self.end_fraction)

    __call__ = progress

    def is_finished(self, training_progress: float) -> bool:
        return self.progress(training_progress) >= 1.0

    def update(self, training_progress: float, *handles: GhostHandle) -> bool:
        """Set every handle's progress; once finished, remove them. Returns True when the ghosts are gone."""
        progress = self.progress(training_progress)
        for handle in handles:
            handle.set_progress(progress)
        if progress >= 1.0:
            for handle in handles:
                handle.remove()
            return True
        return False
