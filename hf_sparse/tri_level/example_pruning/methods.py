"""Example-level data pruning methods (Tri-Level E-ViT level 1 and its controls), their registry and builder.

- ``forgetting``: Tri-Level E-ViT level 1. A random ``inactive_fraction`` starts inactive; at each refresh epoch the
  least-forgotten active examples swap with random inactive ones.
- ``infobatch``: InfoBatch (Qin et al., ICLR 2024) as its paper and code define it: each epoch leaves out a share of
  the examples whose loss is below the mean and up-weights the rest of them; epochs vary in size, the first and the
  last ones train everything.
- ``infobatch_fixed_size``: our variant of it at a constant epoch size (uniform subsets in its first epoch and its
  tail). Before format 2 of the saved state it was called ``infobatch``.
- ``random``: a fresh uniform random subset each epoch (the control for the two above).
- ``none``: every example every epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ...logging_utils import get_logger
from ...validation import check_choice, check_fraction, check_int
from .pruner import STREAM_INIT, STREAM_REFRESH, STREAM_SUBSET, ExamplePruner, StateValue, read_saved

logger = get_logger(__name__)

TIE_BREAKS = ("cls_attention_variance", "random")


def plan_refresh_epochs(num_epochs: int, period_fraction: float = 0.1, last_fraction: float = 0.5) -> list[int]:
    """Refresh epochs as fractions of the run (the paper: every 10 % of the epochs, up to half).

    ``period = max(1, round(period_fraction * num_epochs))``; refreshes at ``period, 2 * period, ...``
    up to ``last_fraction * num_epochs`` inclusive. For 300 epochs: [30, 60, 90, 120, 150], the
    paper's schedule. A refresh at epoch ``e`` happens before epoch ``e`` (0-based) is planned.
    """
    num_epochs = check_int("num_epochs", num_epochs, minimum=1)
    period_fraction = check_fraction("period_fraction", period_fraction, low_inclusive=False, high_inclusive=True)
    last_fraction = check_fraction("last_fraction", last_fraction, low_inclusive=True, high_inclusive=True)
    period = max(1, round(period_fraction * num_epochs))
    last = last_fraction * num_epochs + 1e-9  # tolerate float noise such as 0.5 * 30 = 15.000000000000002
    return [epoch for epoch in range(period, num_epochs, period) if epoch <= last]


class ForgettingExamplePruner(ExamplePruner):
    """Tri-Level E-ViT level 1: an active set of constant size, refreshed by forgetting scores.

    A random ``inactive_fraction`` (paper: 0.2) of the examples starts inactive; each epoch trains a
    shuffle of the active set. Before each epoch in ``refresh_epochs`` (see
    :func:`plan_refresh_epochs`), every active example seen since the last refresh gets a score, its
    forgetting count, or (max count + 1) if it was never correct in that window. The ``swap_size``
    lowest-scored (least forgotten, easiest) go to the inactive pool, ties broken by lower last
    CLS-attention variance first (``tie_break="cls_attention_variance"``; unknown variance last), then
    by a seeded random permutation (never by index). As many random examples come back from the
    inactive pool as it held before the swap (the ones just removed are excluded). The window
    statistics are then reset.

    ``refresh_epochs`` defaults to none (a fixed random active set, the pruner used alone); pass ``None`` to plan
    them from ``refresh_period_fraction`` / ``refresh_last_fraction`` once the run's length is known, which is what
    `TriLevelTrainer` does.

    Choices (the paper leaves them open): active examples not presented since the last refresh are
    never removed (their score is unknown); ``last_correct`` survives a refresh, so a transition
    between the last presentation before and the first after a refresh still counts (with refresh
    periods of one or two epochs, a window alone would hold almost no transitions).
    """

    method = "forgetting"

    def __init__(
        self,
        num_examples: int,
        inactive_fraction: float | None = None,
        seed: int = 0,
        *,
        refresh_epochs: Iterable[int] | None = (),
        refresh_period_fraction: float = 0.1,
        refresh_last_fraction: float = 0.5,
        swap_fraction: float = 0.05,
        tie_break: str = "cls_attention_variance",
    ) -> None:
        super().__init__(num_examples, inactive_fraction, seed)
        # Without explicit epochs, the refreshes are planned from the fractions once the run's length is known.
        self._refresh_fractions = None
        if refresh_epochs is None:
            check_fraction("refresh_period_fraction", refresh_period_fraction, low_inclusive=False, high_inclusive=True)
            check_fraction("refresh_last_fraction", refresh_last_fraction, high_inclusive=True)
            self._refresh_fractions = (refresh_period_fraction, refresh_last_fraction)
            refresh_epochs = ()
        if isinstance(refresh_epochs, (str, bytes)) or not isinstance(refresh_epochs, Iterable):
            raise ValueError(f"refresh_epochs must be a list of ints >= 1, got {refresh_epochs!r}.")
        epochs = [check_int("refresh_epochs", epoch, minimum=1) for epoch in refresh_epochs]
        self.refresh_epochs = sorted(set(epochs))
        self.swap_fraction = check_fraction("swap_fraction", swap_fraction, low_inclusive=True, high_inclusive=False)
        self.swap_size = round(self.swap_fraction * self.num_examples)
        if self.swap_size > self.num_inactive:
            raise ValueError(
                f"swap_fraction={self.swap_fraction} swaps {self.swap_size} examples but only {self.num_inactive} "
                f"are inactive (inactive_fraction={self.inactive_fraction}): lower swap_fraction."
            )
        self.tie_break = check_choice("tie_break", tie_break, TIE_BREAKS)
        self.num_refreshes = 0
        inactive = torch.randperm(self.num_examples, generator=self._generator(STREAM_INIT))[: self.num_inactive]
        self.active = torch.ones(self.num_examples, dtype=torch.bool)
        self.active[inactive] = False

    def _plan_run(self, num_epochs: int) -> None:
        if self._refresh_fractions is not None:
            self.refresh_epochs = plan_refresh_epochs(num_epochs, *self._refresh_fractions)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "refresh_epochs": list(self.refresh_epochs),
            "swap_fraction": self.swap_fraction,
            "tie_break": self.tie_break,
        }

    def _on_epoch_start(self, epoch: int) -> None:
        if self._refresh_fractions is not None and self.num_epochs is None:
            raise RuntimeError("The refresh epochs are not planned yet: call plan_run(num_epochs) first.")
        if epoch in self.refresh_epochs:
            self.refresh(epoch)

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._shuffled(torch.nonzero(self.active).squeeze(1), epoch), None

    def removal_order(self, epoch: int) -> torch.Tensor:
        """Active examples seen since the last refresh, in the order they would be removed."""
        self.flush()
        candidates = torch.nonzero(self.active & (self.presentations > 0)).squeeze(1)
        if candidates.numel() == 0:
            return candidates
        score = self.forgetting_count[candidates].to(torch.float64)
        never_correct = ~self.ever_correct[candidates]
        score[never_correct] = score.max() + 1  # never learnt in the window: the hardest
        # Lexicographic order (score, variance, random) from stable sorts, least significant first.
        order = torch.randperm(candidates.numel(), generator=self._generator(STREAM_REFRESH, epoch))
        if self.tie_break == "cls_attention_variance":
            variance = torch.nan_to_num(self.cls_attention_variance[candidates][order], nan=float("inf"))
            order = order[torch.sort(variance, stable=True).indices]
        order = order[torch.sort(score[order], stable=True).indices]
        return candidates[order]

    def refresh(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Swap the least-forgotten active examples with random inactive ones; reset the statistics.

        Returns the (removed, restored) indices. Called automatically before each refresh epoch.
        """
        ranked = self.removal_order(epoch)
        pool = torch.nonzero(~self.active).squeeze(1)
        swap = min(self.swap_size, ranked.numel(), pool.numel())
        removed = ranked[:swap]
        # A separate stream from removal_order's permutation: the two draws stay independent.
        pick = torch.randperm(pool.numel(), generator=self._generator(STREAM_SUBSET, epoch))[:swap]
        restored = pool[pick]
        self.active[removed] = False
        self.active[restored] = True
        self._reset_window_statistics()
        self.num_refreshes += 1
        if swap < self.swap_size:
            logger.info("Refresh at epoch %d swapped %d of %d examples (too few seen).", epoch, swap, self.swap_size)
        return removed, restored

    def state_dict(self) -> dict[str, StateValue]:
        return {**super().state_dict(), "active": self.active.clone(), "num_refreshes": self.num_refreshes}

    def load_state_dict(self, state_dict: Mapping[str, StateValue]) -> None:
        super().load_state_dict(state_dict)
        active = torch.as_tensor(state_dict["active"]).to(torch.bool)
        if active.shape != (self.num_examples,) or int(active.sum()) != self._epoch_size:
            raise ValueError(f"state_dict['active'] must mark {self._epoch_size} of {self.num_examples} examples.")
        self.active = active.clone()
        self.num_refreshes = int(state_dict["num_refreshes"])

    def active_mask(self) -> torch.BoolTensor:
        """The active set (the current epoch's examples; before the first epoch, the initial set)."""
        return self.active.clone()

    def summary(self) -> dict[str, float]:
        return {**super().summary(), "num_refreshes": float(self.num_refreshes)}


class InfoBatchExamplePruner(ExamplePruner):
    """InfoBatch (Qin et al., ICLR 2024): unbiased dynamic pruning of well-learned examples, as its code does it.

    An example's score is its last loss (upstream's ``scores``; an example never trained has none). Before each epoch
    of the first ``floor(delta * num_epochs)`` (upstream: while its epoch counter, one ahead of the 0-based epoch,
    is at most ``delta * num_epochs``), the well-learned pool is the examples whose score is below the mean of the
    known scores. ``floor((1 - prune_ratio) * |pool|)`` of the pool, drawn uniformly (seeded by seed and epoch, the
    same on every rank), are kept and weigh ``1 / (1 - prune_ratio)`` in the loss, so the expected gradient is the
    full data's; the rest of the pool is left out of the epoch; every other example is trained with weight 1. The
    epoch is the examples left, shuffled: its size follows from the losses.

    The first epoch has no scores (all equal, as upstream's start), so nothing is below the mean: it trains every
    example. The last ``num_epochs - floor(delta * num_epochs)`` epochs train every example with weight 1 (upstream's
    annealing). Examples without a known loss (never trained, or a NaN loss) are never in the pool.

    Choices (upstream leaves them to its globals): the order is drawn from seeded generators, never from numpy's
    global state; the mean is over the known scores (upstream starts every score at 3, which only matters for an
    example never trained after the first epoch); ``prune_ratio`` must lie in (0, 1) where upstream clamps the kept
    share to at least 0.1.

    Epoch sizes vary (``fixed_epoch_size`` False): `TriLevelTrainer` plans each epoch before the Trainer counts its
    steps, and keeps the learning-rate schedule on the run's progress in epochs, as upstream's per-epoch rebuilt
    schedule does.
    """

    method = "infobatch"
    default_inactive_fraction = 0.0
    fixed_epoch_size = False

    def __init__(
        self,
        num_examples: int,
        seed: int = 0,
        *,
        num_epochs: int | None = None,
        prune_ratio: float = 0.5,
        delta: float = 0.875,
    ) -> None:
        super().__init__(num_examples, 0.0, seed)
        self.prune_ratio = check_fraction("prune_ratio", prune_ratio, low_inclusive=False, high_inclusive=False)
        self.delta = check_fraction("delta", delta, low_inclusive=True, high_inclusive=True)
        if num_epochs is not None:
            self.plan_run(num_epochs)

    def config(self) -> dict[str, Any]:
        return {
            "num_examples": self.num_examples,
            "seed": self.seed,
            "num_epochs": self.num_epochs,
            "prune_ratio": self.prune_ratio,
            "delta": self.delta,
        }

    @property
    def num_pruning_epochs(self) -> int:
        """The epochs that may prune: the first ``floor(delta * num_epochs)``; the rest train every example."""
        if self.num_epochs is None:
            raise RuntimeError("The InfoBatch epochs are not planned yet: call plan_run(num_epochs) first.")
        return math.floor(self.delta * self.num_epochs + 1e-9)  # tolerate float noise such as 0.875 * 8

    def prunes(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) leaves out well-learned examples (the first epoch has no scores to do it)."""
        return epoch < self.num_pruning_epochs

    def well_learned(self) -> torch.Tensor:
        """The pool: examples whose last loss is below the mean of the known losses, ascending by index."""
        self.flush()
        known = torch.isfinite(self.last_loss)
        if not bool(known.any()):
            return torch.empty(0, dtype=torch.long)
        mean = self.last_loss[known].double().mean()
        return torch.nonzero(known & (self.last_loss.double() < mean)).squeeze(1)

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        everyone = torch.arange(self.num_examples)
        pool = self.well_learned() if self.prunes(epoch) else everyone[:0]
        if pool.numel() == 0:
            return self._shuffled(everyone, epoch), None
        keep_share = 1.0 - self.prune_ratio
        kept_count = math.floor(keep_share * pool.numel() + 1e-9)  # upstream's int(keep_ratio * |pool|)
        drawn = pool[torch.randperm(pool.numel(), generator=self._generator(STREAM_SUBSET, epoch))]
        kept, dropped = drawn[:kept_count], drawn[kept_count:]
        trained = torch.ones(self.num_examples, dtype=torch.bool)
        trained[dropped] = False
        weights = torch.ones(self.num_examples, dtype=torch.float32)
        weights[kept] = 1.0 / keep_share
        return self._shuffled(torch.nonzero(trained).squeeze(1), epoch), weights


class InfoBatchFixedSizeExamplePruner(ExamplePruner):
    """Our InfoBatch variant at a planned (constant) epoch size (``infobatch_fixed_size``; ``infobatch`` before
    format 2 of the saved state): tables call it "InfoBatch, fixed epoch size".

    Epoch 0 trains a uniform random subset of ``epoch_size``. Afterwards, with ``k = num_examples -
    epoch_size``, the pool is InfoBatch's: the examples whose last loss is below the mean of the known
    losses, widened to the ``ceil(k / prune_ratio)`` lowest when smaller, so that no pool member is
    dropped with a probability above ``prune_ratio`` (examples never seen have loss +inf and are never
    in the pool; ties in loss are broken randomly). ``k`` pool members, drawn uniformly, are dropped,
    and the kept pool members get loss weight ``1 / (1 - k / |pool|)``, so the expected gradient equals
    the full-data one; all others weigh 1. During the last ``tail_fraction`` of the epochs
    (``epoch >= (1 - tail_fraction) * num_epochs``, InfoBatch's condition) each epoch is a uniform
    random subset with all weights 1.

    Deviations from InfoBatch (``infobatch``, so tables name this one apart): (1) InfoBatch drops each
    below-mean example with probability ``prune_ratio``, so its epochs vary in size; here exactly
    ``k`` are dropped, which keeps the Trainer's planned steps per epoch (and the learning-rate
    schedule right). (2) Its first epoch and its tail train the full data; here they train uniform
    subsets of the planned size. (3) When fewer than ``k`` examples have a known loss (nothing recorded
    yet), the epoch falls back to a uniform random subset.
    """

    method = "infobatch_fixed_size"

    def __init__(
        self,
        num_examples: int,
        inactive_fraction: float | None = None,
        seed: int = 0,
        *,
        num_epochs: int | None = None,
        prune_ratio: float = 0.5,
        tail_fraction: float = 0.125,
    ) -> None:
        super().__init__(num_examples, inactive_fraction, seed)
        if num_epochs is not None:
            self.plan_run(num_epochs)
        self.prune_ratio = check_fraction("prune_ratio", prune_ratio, low_inclusive=False, high_inclusive=True)
        self.tail_fraction = check_fraction("tail_fraction", tail_fraction, low_inclusive=True, high_inclusive=False)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "num_epochs": self.num_epochs,
            "prune_ratio": self.prune_ratio,
            "tail_fraction": self.tail_fraction,
        }

    @property
    def pool_size(self) -> int:
        """The smallest pool: ``min(N, ceil(k / prune_ratio))`` (the below-mean set may be larger)."""
        if self.num_inactive == 0:
            return 0
        return min(self.num_examples, math.ceil(self.num_inactive / self.prune_ratio - 1e-9))

    def in_tail(self, epoch: int) -> bool:
        if self.num_epochs is None:
            raise RuntimeError("The InfoBatch tail is not planned yet: call plan_run(num_epochs) first.")
        return epoch >= (1.0 - self.tail_fraction) * self.num_epochs

    def _uniform(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_examples, generator=self._generator(STREAM_SUBSET, epoch))[: self._epoch_size]

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        drop_count = self.num_inactive
        if epoch == 0 or drop_count == 0 or self.in_tail(epoch):
            return self._uniform(epoch), None
        # Random permutation, then a stable sort by loss: equal losses end up in random order.
        generator = self._generator(STREAM_SUBSET, epoch)
        permutation = torch.randperm(self.num_examples, generator=generator)
        by_loss = permutation[torch.sort(self.last_loss[permutation], stable=True).indices]
        finite = torch.isfinite(self.last_loss)
        known = int(finite.sum())
        below_mean = int((self.last_loss[finite] < self.last_loss[finite].mean()).sum()) if known else 0
        pool_size = min(max(below_mean, self.pool_size), known)
        if pool_size < drop_count:
            logger.info("InfoBatch epoch %d: only %d examples have a loss; uniform subset instead.", epoch, known)
            return self._uniform(epoch), None
        pool = by_loss[:pool_size]
        dropped = pool[torch.randperm(pool_size, generator=generator)[:drop_count]]
        keep = torch.ones(self.num_examples, dtype=torch.bool)
        keep[dropped] = False
        weights = torch.ones(self.num_examples, dtype=torch.float32)
        if pool_size > drop_count:
            weights[pool] = pool_size / (pool_size - drop_count)  # = 1 / (1 - k / |pool|)
        weights[dropped] = 1.0  # not trained this epoch; keep the table clean
        return self._shuffled(torch.nonzero(keep).squeeze(1), epoch), weights


class RandomExamplePruner(ExamplePruner):
    """A fresh uniform random subset of ``epoch_size`` examples every epoch (the control)."""

    method = "random"

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        # randperm is already a uniformly shuffled order: its first epoch_size entries are the subset.
        return torch.randperm(self.num_examples, generator=self._generator(STREAM_SUBSET, epoch))[
            : self._epoch_size
        ], None


class NoExamplePruner(ExamplePruner):
    """Every example every epoch, in a seeded shuffled order (``inactive_fraction`` must be 0)."""

    method = "none"
    default_inactive_fraction = 0.0

    def __init__(self, num_examples: int, inactive_fraction: float | None = None, seed: int = 0) -> None:
        if inactive_fraction not in (None, 0, 0.0):
            raise ValueError(f"inactive_fraction must be 0 for example_pruning='none', got {inactive_fraction!r}.")
        super().__init__(num_examples, 0.0, seed)

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._shuffled(torch.arange(self.num_examples), epoch), None


EXAMPLE_PRUNERS: dict[str, type[ExamplePruner]] = {
    "forgetting": ForgettingExamplePruner,
    "infobatch": InfoBatchExamplePruner,
    "infobatch_fixed_size": InfoBatchFixedSizeExamplePruner,
    "random": RandomExamplePruner,
    "none": NoExamplePruner,
}

# Fields each method accepts besides num_examples/seed (for clear errors on typos).
_METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "forgetting": (
        "inactive_fraction",
        "refresh_epochs",
        "refresh_period_fraction",
        "refresh_last_fraction",
        "swap_fraction",
        "tie_break",
    ),
    "infobatch": ("prune_ratio", "delta"),
    "infobatch_fixed_size": ("inactive_fraction", "prune_ratio", "tail_fraction"),
    "random": ("inactive_fraction",),
    "none": ("inactive_fraction",),
}


def build_example_pruner(
    method: str, num_examples: int, *, num_epochs: int | None, seed: int, **fields: Any
) -> ExamplePruner:
    """Build a pruner from its method name (the trainer's ``example_pruning`` argument).

    ``num_epochs`` sets what depends on the run's length: ``forgetting`` refreshes at :func:`plan_refresh_epochs`
    ``(num_epochs, refresh_period_fraction=0.1, refresh_last_fraction=0.5)`` unless ``refresh_epochs`` is given;
    ``infobatch`` and ``infobatch_fixed_size`` use it for their last, unpruned epochs. ``None``: the caller plans it
    later with ``plan_run(num_epochs)`` (the
    trainer does, once the Trainer has counted its epochs). Unknown methods or fields raise ``ValueError``.
    """
    check_choice("example_pruning", method, sorted(EXAMPLE_PRUNERS))
    allowed = _METHOD_FIELDS[method]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown} not accepted by example_pruning={method!r}; accepted fields: {list(allowed)}.")
    if method == "forgetting":
        if fields.get("refresh_epochs") is None:
            fields["refresh_epochs"] = None  # planned from the fractions
        elif "refresh_period_fraction" in fields or "refresh_last_fraction" in fields:
            raise ValueError("refresh_epochs and refresh_period_fraction/refresh_last_fraction are exclusive.")
    pruner = EXAMPLE_PRUNERS[method](num_examples, seed=seed, **fields)
    if num_epochs is not None:
        pruner.plan_run(num_epochs)
    return pruner


def load_example_pruner(directory: str | os.PathLike, prefix: str = "example_pruning") -> ExamplePruner:
    """Rebuild a pruner (configuration and state) from the files written by :meth:`ExamplePruner.save`."""
    saved = read_saved(directory, prefix)
    method = saved["method"]
    if method not in EXAMPLE_PRUNERS:
        raise ValueError(f"Saved example_pruning method {method!r} is not one of {sorted(EXAMPLE_PRUNERS)}.")
    pruner = EXAMPLE_PRUNERS[method](**saved["config"])
    pruner.load_state_dict(saved["state"])
    return pruner
