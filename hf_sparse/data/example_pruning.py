"""Example-level data pruning: which training examples each epoch uses (Tri-Level E-ViT level 1).

Plain Python/torch, no Trainer dependency. A pruner owns per-example statistics (CPU tensors of
size ``num_examples``), plans each epoch's example order and gives per-sample loss weights:

- ``forgetting``: Tri-Level E-ViT level 1. A random ``inactive_fraction`` starts inactive; at each
  refresh epoch the least-forgotten active examples swap with random inactive ones.
- ``infobatch``: InfoBatch-style unbiased soft pruning of low-loss examples, with loss rescaling.
- ``random``: a fresh uniform random subset each epoch (the control for the two above).
- ``none``: every example every epoch.

Design constraint from the HF Trainer: it fixes the steps per epoch from the first epoch's
dataloader length, so every method yields exactly ``epoch_size`` indices in every epoch.

Distributed training: every process holds a full pruner; epoch orders depend only on
(seed, epoch, state), and the trainer must call :meth:`ExamplePruner.record` on every rank with the
statistics gathered from all ranks, so all copies stay identical (unlike the reference code, whose
per-rank subsets and statistics undo the sparsity on several GPUs).

Checkpoints: :meth:`ExamplePruner.save` writes ``<prefix>.safetensors`` (tensors) and
``<prefix>.json`` (scalars and the configuration); :meth:`ExamplePruner.load` and
:func:`load_example_pruner` read them back without pickle.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

__all__ = [
    "EXAMPLE_PRUNERS",
    "ExamplePruner",
    "ExamplePruningSampler",
    "ForgettingExamplePruner",
    "InfoBatchExamplePruner",
    "NoExamplePruner",
    "RandomExamplePruner",
    "build_example_pruner",
    "load_example_pruner",
    "plan_refresh_epochs",
]

StateValue = torch.Tensor | int | float | str
_FORMAT_VERSION = 1
_TIE_BREAKS = ("cls_attention_variance", "random")
# Stream identifiers for the per-purpose random generators (see ExamplePruner._generator).
_STREAM_INIT, _STREAM_ORDER, _STREAM_SUBSET, _STREAM_REFRESH = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------
# validation helpers: every bad field raises ValueError naming it
# --------------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return int(value)


def _check_fraction(name: str, value: Any, *, low: float, high: float, include_low: bool, include_high: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    low_ok = value >= low if include_low else value > low
    high_ok = value <= high if include_high else value < high
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    return value


def plan_refresh_epochs(num_epochs: int, period_fraction: float = 0.1, last_fraction: float = 0.5) -> list[int]:
    """Refresh epochs as fractions of the run (the paper: every 10 % of the epochs, up to half).

    ``period = max(1, round(period_fraction * num_epochs))``; refreshes at ``period, 2 * period, ...``
    up to ``last_fraction * num_epochs`` inclusive. For 300 epochs: [30, 60, 90, 120, 150], the
    paper's schedule. A refresh at epoch ``e`` happens before epoch ``e`` (0-based) is planned.
    """
    num_epochs = _check_int("num_epochs", num_epochs, minimum=1)
    period_fraction = _check_fraction(
        "period_fraction", period_fraction, low=0, high=1, include_low=False, include_high=True
    )
    last_fraction = _check_fraction("last_fraction", last_fraction, low=0, high=1, include_low=True, include_high=True)
    period = max(1, round(period_fraction * num_epochs))
    last = last_fraction * num_epochs + 1e-9  # tolerate float noise such as 0.5 * 30 = 15.000000000000002
    return [epoch for epoch in range(period, num_epochs, period) if epoch <= last]


# --------------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------------
class ExamplePruner:
    """Base class: per-example statistics, epoch planning, loss weights, state round trip.

    Subclasses set ``method``, add their fields to :meth:`config`, and override
    :meth:`_on_epoch_start` (state changes when a new epoch begins, e.g. a refresh) and
    :meth:`_plan_epoch` (the epoch's order and optional loss weights).

    Statistics (all CPU tensors of size ``num_examples``, updated by :meth:`record`):
    ``last_correct`` (int8: -1 never seen, 0 wrong, 1 right at the last presentation),
    ``forgetting_count`` (int32: right -> wrong transitions between consecutive presentations),
    ``ever_correct`` (bool), ``presentations`` (int32), ``cls_attention_variance`` (float32, NaN
    when unknown) and ``last_loss`` (float32, +inf never seen). Subclasses may reset the window
    statistics (forgetting count, ever-correct, presentations, variance) at a refresh.
    """

    method: ClassVar[str] = ""
    default_inactive_fraction: ClassVar[float] = 0.2

    def __init__(self, num_examples: int, inactive_fraction: float | None = None, seed: int = 0) -> None:
        self.num_examples = _check_int("num_examples", num_examples, minimum=1)
        if inactive_fraction is None:
            inactive_fraction = self.default_inactive_fraction
        self.inactive_fraction = _check_fraction(
            "inactive_fraction", inactive_fraction, low=0, high=1, include_low=True, include_high=False
        )
        self.seed = _check_int("seed", seed)
        self._epoch_size = self.num_examples - round(self.inactive_fraction * self.num_examples)
        if self._epoch_size < 1:
            raise ValueError(
                f"inactive_fraction={self.inactive_fraction} leaves no example of {self.num_examples} to train on."
            )
        count = self.num_examples
        self.last_correct = torch.full((count,), -1, dtype=torch.int8)
        self.forgetting_count = torch.zeros(count, dtype=torch.int32)
        self.ever_correct = torch.zeros(count, dtype=torch.bool)
        self.presentations = torch.zeros(count, dtype=torch.int32)
        self.cls_attention_variance = torch.full((count,), float("nan"), dtype=torch.float32)
        self.last_loss = torch.full((count,), float("inf"), dtype=torch.float32)
        # The planned epoch: -1 before the first call to epoch_indices.
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)
        self._weights: torch.Tensor | None = None  # per-example loss weights of the current epoch

    # ---- planning -------------------------------------------------------------------------------
    @property
    def epoch_size(self) -> int:
        """Examples per epoch: ``num_examples - round(inactive_fraction * num_examples)``, constant."""
        return self._epoch_size

    @property
    def num_inactive(self) -> int:
        return self.num_examples - self._epoch_size

    @property
    def current_epoch(self) -> int:
        """The epoch last planned by :meth:`epoch_indices` (-1 before the first)."""
        return self._epoch

    def _generator(self, stream: int, epoch: int = 0) -> torch.Generator:
        """An independent generator per (seed, purpose, epoch): plans never depend on how many random
        numbers another step drew, so they are reproducible on every process and after a resume."""
        entropy = [self.seed & 0xFFFFFFFFFFFFFFFF, stream, epoch]
        state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state >> np.uint64(1)))

    def _shuffled(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        return indices[torch.randperm(indices.numel(), generator=self._generator(_STREAM_ORDER, epoch))]

    def _on_epoch_start(self, epoch: int) -> None:
        """State changes when ``epoch`` begins (called once per epoch, in order, also for skipped ones)."""

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The epoch's order (``epoch_size`` indices) and optional per-example loss weights."""
        raise NotImplementedError

    def epoch_indices(self, epoch: int) -> torch.LongTensor:
        """The examples trained in ``epoch``, shuffled; identical on every process.

        Idempotent for the current epoch (also after :meth:`load_state_dict`). A later epoch first
        applies the method's per-epoch rule (e.g. a refresh) for each epoch passed, in order.
        """
        epoch = _check_int("epoch", epoch, minimum=0)
        if epoch < self._epoch:
            raise ValueError(
                f"epoch {epoch} is before the current epoch {self._epoch}: the pruner's state only moves "
                "forward. To go back, load_state_dict() a state saved at that epoch."
            )
        if epoch > self._epoch:
            for passed in range(self._epoch + 1, epoch + 1):
                self._on_epoch_start(passed)
            order, weights = self._plan_epoch(epoch)
            if order.numel() != self._epoch_size:  # an internal invariant the Trainer relies on
                raise RuntimeError(f"{self.method} planned {order.numel()} examples, expected {self._epoch_size}.")
            self._order, self._weights, self._epoch = order.to(torch.long), weights, epoch
        return self._order.clone()

    def active_mask(self) -> torch.BoolTensor:
        """Examples trained in the current epoch (epoch 0 is planned if nothing was planned yet)."""
        if self._epoch < 0:
            self.epoch_indices(0)
        mask = torch.zeros(self.num_examples, dtype=torch.bool)
        mask[self._order] = True
        return mask

    def loss_weights(self, indices: torch.Tensor) -> torch.FloatTensor:
        """Per-sample loss multipliers for a batch (1 except under InfoBatch's rescaling), on the
        device of ``indices``."""
        if self._weights is None:
            return torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        return self._weights[indices.detach().to("cpu", torch.long)].to(indices.device)

    # ---- statistics -----------------------------------------------------------------------------
    def record(
        self,
        indices: torch.Tensor,
        correct: torch.Tensor,
        loss: torch.Tensor,
        cls_attention_variance: torch.Tensor | None = None,
    ) -> None:
        """Update per-example statistics from one (gathered) batch, vectorised.

        Args:
            indices: dataset indices (B,), any device.
            correct: whether each sample was classified correctly (B,), bool.
            loss: per-sample loss (B,); NaN counts as unknown-hard (+inf).
            cls_attention_variance: variance of the last block's CLS->patch attention (B,), or None.

        An index repeated within one call (accelerate pads the last batch with duplicates) counts
        as one presentation, the first occurrence's values being used.
        """
        # One transfer per tensor, never per sample.
        indices = indices.detach().to("cpu", torch.long).reshape(-1)
        correct = correct.detach().to("cpu", torch.bool).reshape(-1)
        loss = loss.detach().to("cpu", torch.float32).reshape(-1)
        variance = (
            None
            if cls_attention_variance is None
            else cls_attention_variance.detach().to("cpu", torch.float32).reshape(-1)
        )
        count = indices.numel()
        if correct.numel() != count or loss.numel() != count or (variance is not None and variance.numel() != count):
            raise ValueError(
                f"record(): indices ({count}), correct ({correct.numel()}), loss ({loss.numel()})"
                + ("" if variance is None else f", cls_attention_variance ({variance.numel()})")
                + " must have the same number of elements."
            )
        if count == 0:
            return
        if int(indices.min()) < 0 or int(indices.max()) >= self.num_examples:
            raise ValueError(f"record(): indices must lie in [0, {self.num_examples}).")
        unique, inverse = torch.unique(indices, return_inverse=True)
        if unique.numel() != count:
            positions = torch.arange(count)
            first = torch.full((unique.numel(),), count, dtype=torch.long).scatter_reduce_(
                0, inverse, positions, "amin"
            )
            indices, correct, loss = indices[first], correct[first], loss[first]
            variance = None if variance is None else variance[first]

        previous = self.last_correct[indices]
        forgot = (previous == 1) & ~correct  # right last time, wrong now
        self.forgetting_count[indices] += forgot.to(torch.int32)
        self.last_correct[indices] = correct.to(torch.int8)
        self.ever_correct[indices] |= correct
        self.presentations[indices] += 1
        self.last_loss[indices] = torch.nan_to_num(loss, nan=float("inf"))
        if variance is not None:
            self.cls_attention_variance[indices] = variance

    def _reset_window_statistics(self) -> None:
        """Forget the window's statistics. ``last_correct`` is kept: it is the last presentation's
        outcome, needed to count the next transition; ``last_loss`` stays the latest known loss."""
        self.forgetting_count.zero_()
        self.ever_correct.zero_()
        self.presentations.zero_()
        self.cls_attention_variance.fill_(float("nan"))

    def summary(self) -> dict[str, float]:
        """Floats for logging."""
        seen = self.presentations > 0
        ever_seen = self.last_correct >= 0
        finite_loss = torch.isfinite(self.last_loss)
        num_seen = int(seen.sum())
        return {
            "epoch": float(self._epoch),
            "active_fraction": self._epoch_size / self.num_examples,
            "seen_fraction": num_seen / self.num_examples,
            "mean_forgetting": float(self.forgetting_count[seen].float().mean()) if num_seen else 0.0,
            "forgotten_fraction": float((self.forgetting_count > 0).float().mean()),
            "never_correct_fraction": float((seen & ~self.ever_correct).sum()) / max(num_seen, 1),
            "last_accuracy": float((self.last_correct[ever_seen] == 1).float().mean())
            if bool(ever_seen.any())
            else 0.0,
            "mean_loss": float(self.last_loss[finite_loss].mean()) if bool(finite_loss.any()) else float("nan"),
            "mean_loss_weight": float(self._weights[self._order].mean()) if self._weights is not None else 1.0,
        }

    # ---- configuration and state ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able): ``type(self)(**config())`` rebuilds a fresh pruner."""
        return {"num_examples": self.num_examples, "inactive_fraction": self.inactive_fraction, "seed": self.seed}

    def state_dict(self) -> dict[str, StateValue]:
        """Everything needed to continue identically: tensors (statistics, the current epoch's order and
        weights) and scalars (identity and the current epoch)."""
        state: dict[str, StateValue] = {
            "method": self.method,
            "format_version": _FORMAT_VERSION,
            "num_examples": self.num_examples,
            "epoch_size": self._epoch_size,
            "seed": self.seed,
            "epoch": self._epoch,
            "last_correct": self.last_correct.clone(),
            "forgetting_count": self.forgetting_count.clone(),
            "ever_correct": self.ever_correct.clone(),
            "presentations": self.presentations.clone(),
            "cls_attention_variance": self.cls_attention_variance.clone(),
            "last_loss": self.last_loss.clone(),
            "epoch_order": self._order.clone(),
        }
        if self._weights is not None:
            state["epoch_weights"] = self._weights.clone()
        return state

    _IDENTITY_KEYS: ClassVar[tuple[str, ...]] = ("method", "num_examples", "epoch_size", "seed")
    _STAT_KEYS: ClassVar[dict[str, torch.dtype]] = {
        "last_correct": torch.int8,
        "forgetting_count": torch.int32,
        "ever_correct": torch.bool,
        "presentations": torch.int32,
        "cls_attention_variance": torch.float32,
        "last_loss": torch.float32,
    }

    def load_state_dict(self, state_dict: Mapping[str, StateValue]) -> None:
        """Restore a :meth:`state_dict`; the identity (method, size, epoch size, seed) must match."""
        for key in self._IDENTITY_KEYS:
            expected = getattr(self, "_epoch_size" if key == "epoch_size" else key)
            if key not in state_dict:
                raise ValueError(f"state_dict lacks {key!r}.")
            if state_dict[key] != expected:
                raise ValueError(f"state_dict has {key}={state_dict[key]!r}, this pruner has {key}={expected!r}.")
        for key, dtype in self._STAT_KEYS.items():
            value = torch.as_tensor(state_dict[key])
            if value.shape != (self.num_examples,):
                raise ValueError(
                    f"state_dict[{key!r}] has shape {tuple(value.shape)}, expected ({self.num_examples},)."
                )
            setattr(self, key, value.to(dtype).clone())
        epoch = int(state_dict["epoch"])
        order = torch.as_tensor(state_dict["epoch_order"]).to(torch.long).clone()
        if order.numel() != (self._epoch_size if epoch >= 0 else 0):
            raise ValueError(f"state_dict['epoch_order'] has {order.numel()} entries for epoch {epoch}.")
        weights = state_dict.get("epoch_weights")
        self._epoch, self._order = epoch, order
        self._weights = None if weights is None else torch.as_tensor(weights).to(torch.float32).clone()

    def save(self, directory: str | os.PathLike, prefix: str = "example_pruning") -> tuple[Path, Path]:
        """Write ``<prefix>.safetensors`` (tensors) and ``<prefix>.json`` (scalars + config)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {key: value.contiguous() for key, value in state.items() if isinstance(value, torch.Tensor)}
        scalars = {key: value for key, value in state.items() if not isinstance(value, torch.Tensor)}
        tensor_path, json_path = directory / f"{prefix}.safetensors", directory / f"{prefix}.json"
        save_file(tensors, str(tensor_path), metadata={"method": self.method})
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump({"method": self.method, "config": self.config(), "state": scalars}, handle, indent=2)
        return tensor_path, json_path

    def load(self, directory: str | os.PathLike, prefix: str = "example_pruning") -> None:
        """Load the state written by :meth:`save` into this pruner (no pickle involved)."""
        saved = _read_saved(directory, prefix)
        if saved["config"] != self.config():
            logger.warning(
                "Example pruner configuration differs from the saved one (%s vs %s); continuing with this one.",
                self.config(),
                saved["config"],
            )
        self.load_state_dict(saved["state"])

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({fields})"


def _read_saved(directory: str | os.PathLike, prefix: str) -> dict[str, Any]:
    directory = Path(directory)
    tensor_path, json_path = directory / f"{prefix}.safetensors", directory / f"{prefix}.json"
    missing = [str(path) for path in (tensor_path, json_path) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Example pruning state not found: missing {missing}.")
    with open(json_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    saved["state"] = {**saved["state"], **load_file(str(tensor_path))}
    return saved


# --------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------
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
        refresh_epochs: Iterable[int] = (),
        swap_fraction: float = 0.05,
        tie_break: str = "cls_attention_variance",
    ) -> None:
        super().__init__(num_examples, inactive_fraction, seed)
        if isinstance(refresh_epochs, (str, bytes)) or not isinstance(refresh_epochs, Iterable):
            raise ValueError(f"refresh_epochs must be a list of ints >= 1, got {refresh_epochs!r}.")
        epochs = [_check_int("refresh_epochs", epoch, minimum=1) for epoch in refresh_epochs]
        self.refresh_epochs = sorted(set(epochs))
        self.swap_fraction = _check_fraction(
            "swap_fraction", swap_fraction, low=0, high=1, include_low=True, include_high=False
        )
        self.swap_size = round(self.swap_fraction * self.num_examples)
        if self.swap_size > self.num_inactive:
            raise ValueError(
                f"swap_fraction={self.swap_fraction} swaps {self.swap_size} examples but only {self.num_inactive} "
                f"are inactive (inactive_fraction={self.inactive_fraction}): lower swap_fraction."
            )
        if tie_break not in _TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {list(_TIE_BREAKS)}, got {tie_break!r}.")
        self.tie_break = tie_break
        self.num_refreshes = 0
        inactive = torch.randperm(self.num_examples, generator=self._generator(_STREAM_INIT))[: self.num_inactive]
        self.active = torch.ones(self.num_examples, dtype=torch.bool)
        self.active[inactive] = False

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "refresh_epochs": list(self.refresh_epochs),
            "swap_fraction": self.swap_fraction,
            "tie_break": self.tie_break,
        }

    def _on_epoch_start(self, epoch: int) -> None:
        if epoch in self.refresh_epochs:
            self.refresh(epoch)

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._shuffled(torch.nonzero(self.active).squeeze(1), epoch), None

    def removal_order(self, epoch: int) -> torch.Tensor:
        """Active examples seen since the last refresh, in the order they would be removed."""
        candidates = torch.nonzero(self.active & (self.presentations > 0)).squeeze(1)
        if candidates.numel() == 0:
            return candidates
        score = self.forgetting_count[candidates].to(torch.float64)
        never_correct = ~self.ever_correct[candidates]
        score[never_correct] = score.max() + 1  # never learnt in the window: the hardest
        # Lexicographic order (score, variance, random) from stable sorts, least significant first.
        order = torch.randperm(candidates.numel(), generator=self._generator(_STREAM_REFRESH, epoch))
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
        pick = torch.randperm(pool.numel(), generator=self._generator(_STREAM_SUBSET, epoch))[:swap]
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
    """InfoBatch-style unbiased soft pruning, adapted to a planned (constant) epoch size.

    Epoch 0 trains a uniform random subset of ``epoch_size``. Afterwards, with ``k = num_examples -
    epoch_size``, the pool is the ``min(N, ceil(k / prune_ratio))`` examples with the lowest last loss
    (examples never seen have loss +inf and are never in the pool; ties in loss are broken randomly);
    ``k`` pool members, drawn uniformly, are dropped, and the kept pool members get loss weight
    ``1 / (1 - k / |pool|)``, so the expected gradient equals the full-data one; all others weigh 1.
    During the last ``tail_fraction`` of the epochs (``epoch >= (1 - tail_fraction) * num_epochs``,
    InfoBatch's condition) each epoch is a uniform random subset with all weights 1.

    Deviations from InfoBatch: (1) InfoBatch prunes a ratio of the below-mean-loss samples, so its
    epoch size varies; here the drop count is fixed (``k``) and the pool size follows from it, which
    keeps the Trainer's planned steps per epoch; ``prune_ratio`` plays InfoBatch's role (0.5 = its
    default: half the pool is dropped). (2) InfoBatch trains on the full data in the tail; here the
    tail keeps the planned size with a uniform subset. (3) When fewer than ``k`` examples have a known
    loss (nothing recorded yet), the epoch falls back to a uniform random subset.
    """

    method = "infobatch"

    def __init__(
        self,
        num_examples: int,
        inactive_fraction: float | None = None,
        seed: int = 0,
        *,
        num_epochs: int,
        prune_ratio: float = 0.5,
        tail_fraction: float = 0.125,
    ) -> None:
        super().__init__(num_examples, inactive_fraction, seed)
        self.num_epochs = _check_int("num_epochs", num_epochs, minimum=1)
        self.prune_ratio = _check_fraction(
            "prune_ratio", prune_ratio, low=0, high=1, include_low=False, include_high=True
        )
        self.tail_fraction = _check_fraction(
            "tail_fraction", tail_fraction, low=0, high=1, include_low=True, include_high=False
        )

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "num_epochs": self.num_epochs,
            "prune_ratio": self.prune_ratio,
            "tail_fraction": self.tail_fraction,
        }

    @property
    def pool_size(self) -> int:
        """``min(N, ceil(k / prune_ratio))`` before excluding unseen examples."""
        if self.num_inactive == 0:
            return 0
        return min(self.num_examples, math.ceil(self.num_inactive / self.prune_ratio - 1e-9))

    def in_tail(self, epoch: int) -> bool:
        return epoch >= (1.0 - self.tail_fraction) * self.num_epochs

    def _uniform(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_examples, generator=self._generator(_STREAM_SUBSET, epoch))[: self._epoch_size]

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        drop_count = self.num_inactive
        if epoch == 0 or drop_count == 0 or self.in_tail(epoch):
            return self._uniform(epoch), None
        # Random permutation, then a stable sort by loss: equal losses end up in random order.
        generator = self._generator(_STREAM_SUBSET, epoch)
        permutation = torch.randperm(self.num_examples, generator=generator)
        by_loss = permutation[torch.sort(self.last_loss[permutation], stable=True).indices]
        known = int(torch.isfinite(self.last_loss).sum())
        pool_size = min(self.pool_size, known)
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
        return torch.randperm(self.num_examples, generator=self._generator(_STREAM_SUBSET, epoch))[
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
    "infobatch": ("inactive_fraction", "prune_ratio", "tail_fraction"),
    "random": ("inactive_fraction",),
    "none": ("inactive_fraction",),
}


def build_example_pruner(method: str, num_examples: int, *, num_epochs: int, seed: int, **fields: Any) -> ExamplePruner:
    """Build a pruner from its method name (the trainer's ``example_pruning`` argument).

    ``num_epochs`` sets the defaults that depend on the run length: ``forgetting`` refreshes at
    :func:`plan_refresh_epochs` ``(num_epochs, refresh_period_fraction=0.1, refresh_last_fraction=0.5)``
    unless ``refresh_epochs`` is given; ``infobatch`` uses it for its tail. Unknown methods or fields
    raise ``ValueError``.
    """
    if method not in EXAMPLE_PRUNERS:
        raise ValueError(f"example_pruning must be one of {sorted(EXAMPLE_PRUNERS)}, got {method!r}.")
    num_epochs = _check_int("num_epochs", num_epochs, minimum=1)
    allowed = _METHOD_FIELDS[method]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown} not accepted by example_pruning={method!r}; accepted fields: {list(allowed)}.")
    if method == "forgetting":
        period = fields.pop("refresh_period_fraction", None)
        last = fields.pop("refresh_last_fraction", None)
        if fields.get("refresh_epochs") is None:
            fields["refresh_epochs"] = plan_refresh_epochs(
                num_epochs, 0.1 if period is None else period, 0.5 if last is None else last
            )
        elif period is not None or last is not None:
            raise ValueError("refresh_epochs and refresh_period_fraction/refresh_last_fraction are exclusive.")
    if method == "infobatch":
        fields["num_epochs"] = num_epochs
    return EXAMPLE_PRUNERS[method](num_examples, seed=seed, **fields)


def load_example_pruner(directory: str | os.PathLike, prefix: str = "example_pruning") -> ExamplePruner:
    """Rebuild a pruner (configuration and state) from the files written by :meth:`ExamplePruner.save`."""
    saved = _read_saved(directory, prefix)
    method = saved["method"]
    if method not in EXAMPLE_PRUNERS:
        raise ValueError(f"Saved example_pruning method {method!r} is not one of {sorted(EXAMPLE_PRUNERS)}.")
    pruner = EXAMPLE_PRUNERS[method](**saved["config"])
    pruner.load_state_dict(saved["state"])
    return pruner


# --------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------
class ExamplePruningSampler(Sampler[int]):
    """A ``torch`` sampler that yields ``pruner.epoch_indices(epoch)``.

    ``len()`` is the constant ``epoch_size``. Every process iterates the same order, so accelerate's
    batch sharding splits it without overlap. The epoch comes from :meth:`set_epoch` (the Trainer and
    accelerate call it); a completed pass also advances it, like accelerate's ``SeedableRandomSampler``,
    so a loop that never calls ``set_epoch`` still gets a new epoch each pass.
    """

    def __init__(self, pruner: ExamplePruner, epoch: int = 0) -> None:
        self.pruner = pruner
        self.epoch = _check_int("epoch", epoch, minimum=0)

    def __len__(self) -> int:
        return self.pruner.epoch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, minimum=0)

    def __iter__(self) -> Iterator[int]:
        # Plan when iteration starts: all of the previous epoch's records are in by then.
        order = self.pruner.epoch_indices(self.epoch).tolist()
        yield from order
        self.epoch += 1
