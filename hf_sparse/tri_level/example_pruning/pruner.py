"""The base of every example pruner: per-example statistics, epoch planning, loss weights and the state round trip.

Plain Python/torch, no Trainer dependency. A pruner owns per-example statistics (CPU tensors of size
``num_examples``), plans each epoch's example order and gives per-sample loss weights; the methods are in
``methods.py``.

Epoch sizes: the HF Trainer fixes the steps per epoch from the first epoch's dataloader length, so the fixed-size
methods (``fixed_epoch_size = True``: all but InfoBatch) yield exactly ``epoch_size`` indices in every epoch.
InfoBatch's epochs have the size its losses leave: `TriLevelTrainer` plans each such epoch before the Trainer counts
its steps, and notes them (:meth:`ExamplePruner.note_optimizer_steps`) so that the run's plan and its learning-rate
progress survive a resume. :attr:`ExamplePruner.epoch_sizes` keeps the size of every planned epoch.

Distributed training: every process holds a full pruner; epoch orders depend only on (seed, epoch, state), and the
trainer must call :meth:`ExamplePruner.record` (or :meth:`ExamplePruner.record_async` /
:meth:`ExamplePruner.record_packed_async`) on every rank with the statistics gathered from all ranks, so all copies
stay identical (unlike the reference code, whose per-rank subsets and statistics undo the sparsity on several GPUs).

Accelerators: nothing a training step calls waits for the device. :meth:`ExamplePruner.loss_weights` indexes a copy
of the weight table kept on the batch's device; :meth:`ExamplePruner.record_async` packs the statistics into one
tensor and queues it (the packed layout and the queue are in ``deferred.py``): its copy to the host starts
non-blocking and it is applied later, in order, before anything reads the statistics (planning an epoch, a refresh,
saving, :meth:`ExamplePruner.flush`).

Checkpoints: :meth:`ExamplePruner.save` writes ``<prefix>.safetensors`` (tensors) and ``<prefix>.json`` (scalars and
the configuration); :meth:`ExamplePruner.load` reads them back without pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...logging_utils import get_logger
from ...validation import check_fraction, check_int
from .deferred import DeferredRecords, pack_statistics

logger = get_logger(__name__)

StateValue = torch.Tensor | int | float | str
# 2: "infobatch" is InfoBatch itself; states of version 1 saved as "infobatch" are the fixed-size mode (see _migrate).
FORMAT_VERSION = 2
# Stream identifiers for the per-purpose random generators (see ExamplePruner._generator).
STREAM_INIT, STREAM_ORDER, STREAM_SUBSET, STREAM_REFRESH = 0, 1, 2, 3

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
    # False: the epochs' sizes follow from the statistics (InfoBatch); `epoch_size` is then the current epoch's.
    fixed_epoch_size: ClassVar[bool] = True

    def __init__(self, num_examples: int, inactive_fraction: float | None = None, seed: int = 0) -> None:
        self.num_examples = check_int("num_examples", num_examples, minimum=1)
        if inactive_fraction is None:
            inactive_fraction = self.default_inactive_fraction
        self.inactive_fraction = check_fraction("inactive_fraction", inactive_fraction, low_inclusive=True, high_inclusive=False)
        self.seed = check_int("seed", seed)
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
        # (`_weights`, its copy on the training device), so a step indexes the table where the batch is
        self._device_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self._deferred = DeferredRecords(self._record)  # batches queued by record_async, not applied yet
        self._epoch_sizes: list[int] = []  # examples of each planned epoch, by epoch (-1: skipped, never planned)
        self._optimizer_steps: list[int] = []  # the trainer's optimizer steps of each epoch (see note_optimizer_steps)
        self.num_epochs: int | None = None  # the run's length, once planned (see plan_run)
        self.samples_recorded = 0  # presentations recorded over the run (all ranks)

    # ---- planning -------------------------------------------------------------------------------
    @property
    def epoch_size(self) -> int:
        """Examples per epoch: ``num_examples - round(inactive_fraction * num_examples)``, constant for the fixed-size
        methods. Where epochs vary (``fixed_epoch_size`` False), the size of the epoch planned last (before the first,
        of the first: every example)."""
        if self.fixed_epoch_size or self._epoch < 0:
            return self._epoch_size
        return self._order.numel()

    @property
    def epoch_sizes(self) -> list[int]:
        """The size of every epoch planned so far, by epoch (-1 for an epoch skipped without being planned)."""
        return list(self._epoch_sizes)

    @property
    def optimizer_steps_per_epoch(self) -> list[int]:
        """The optimizer steps of each epoch as noted by the trainer (:meth:`note_optimizer_steps`), by epoch."""
        return list(self._optimizer_steps)

    def note_optimizer_steps(self, epoch: int, steps: int) -> None:
        """Note how many optimizer steps the trainer makes of ``epoch`` (saved with the state: a resumed run finds its
        place, and its learning-rate progress, in epochs whose sizes vary)."""
        epoch = check_int("epoch", epoch, minimum=0)
        steps = check_int("steps", steps, minimum=0)
        if epoch > len(self._optimizer_steps):
            raise ValueError(f"note_optimizer_steps: epoch {epoch} follows unnoted epochs (noted: "
                             f"{len(self._optimizer_steps)}); note every epoch in order.")
        del self._optimizer_steps[epoch:]
        self._optimizer_steps.append(steps)

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
        return indices[torch.randperm(indices.numel(), generator=self._generator(STREAM_ORDER, epoch))]

    def plan_run(self, num_epochs: int) -> None:
        """Tell the pruner how many epochs the run has (refresh epochs, tails and such are fractions of it)."""
        self.num_epochs = check_int("num_epochs", num_epochs, minimum=1)
        self._plan_run(self.num_epochs)

    def _plan_run(self, num_epochs: int) -> None:
        """What a method plans from the run's length (nothing by default)."""

    def _on_epoch_start(self, epoch: int) -> None:
        """State changes when ``epoch`` begins (called once per epoch, in order, also for skipped ones)."""

    def _plan_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The epoch's order (``epoch_size`` indices where the size is fixed) and optional per-example loss weights."""
        raise NotImplementedError

    def epoch_indices(self, epoch: int) -> torch.LongTensor:
        """The examples trained in ``epoch``, shuffled; identical on every process.

        Idempotent for the current epoch (also after :meth:`load_state_dict`). A later epoch first
        applies the method's per-epoch rule (e.g. a refresh) for each epoch passed, in order.
        """
        epoch = check_int("epoch", epoch, minimum=0)
        self.flush()  # the plan (and a refresh) must see every recorded batch
        if epoch < self._epoch:
            raise ValueError(
                f"epoch {epoch} is before the current epoch {self._epoch}: the pruner's state only moves "
                "forward. To go back, load_state_dict() a state saved at that epoch."
            )
        if epoch > self._epoch:
            for passed in range(self._epoch + 1, epoch + 1):
                self._on_epoch_start(passed)
            order, weights = self._plan_epoch(epoch)
            if self.fixed_epoch_size and order.numel() != self._epoch_size:  # an invariant the Trainer relies on
                raise RuntimeError(f"{self.method} planned {order.numel()} examples, expected {self._epoch_size}.")
            self._order, self._weights, self._epoch = order.to(torch.long), weights, epoch
            self._epoch_sizes.extend([-1] * (epoch - len(self._epoch_sizes)))
            self._epoch_sizes[epoch:] = [order.numel()]
        return self._order.clone()

    def active_mask(self) -> torch.BoolTensor:
        """Examples trained in the current epoch (epoch 0 is planned if nothing was planned yet)."""
        if self._epoch < 0:
            self.epoch_indices(0)
        self.flush()
        mask = torch.zeros(self.num_examples, dtype=torch.bool)
        mask[self._order] = True
        return mask

    def loss_weights(self, indices: torch.Tensor) -> torch.FloatTensor:
        """Per-sample loss multipliers for a batch (1 except under InfoBatch's rescaling), on the
        device of ``indices``, without waiting for the device: the epoch's weight table is copied to
        that device once per epoch and indexed there."""
        if self._weights is None:
            return torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        return self._weights_on(indices.device)[indices.detach().long()]

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        """The current epoch's weight table on ``device``, copied when the table or the device changes."""
        cached = self._device_weights
        if cached is None or cached[0] is not self._weights or cached[1].device != device:
            weights = self._weights
            if device.type == "cuda":  # from pinned memory the copy is queued without waiting for the device
                weights = weights.pin_memory()
            cached = self._device_weights = (self._weights, weights.to(device, non_blocking=True))
        return cached[1]

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
        self.flush()  # batches queued by record_async came first
        self._record(indices, correct, loss, cls_attention_variance)

    def record_async(
        self,
        indices: torch.Tensor,
        correct: torch.Tensor,
        loss: torch.Tensor,
        cls_attention_variance: torch.Tensor | None = None,
    ) -> None:
        """:meth:`record` without waiting for the device (the arguments are the same): packs the batch
        (:func:`~.deferred.pack_statistics`) and queues it with :meth:`record_packed_async`."""
        statistics = pack_statistics(indices, correct, loss, cls_attention_variance)
        self.record_packed_async(statistics, has_variance=cls_attention_variance is not None)

    def record_packed_async(self, statistics: torch.Tensor, has_variance: bool) -> None:
        """Queue a batch packed by :func:`~.deferred.pack_statistics` (``has_variance`` False: its variance column
        is ignored) without waiting for the device.

        Its copy to the host starts now, non-blocking; queued batches are applied in order, as soon as their copy
        has finished (checked at each call, never waited for) and at the latest when something reads the
        statistics: :meth:`epoch_indices`, :meth:`active_mask`, :meth:`summary`, :meth:`state_dict` (so every
        save), :meth:`record` or :meth:`flush`. Read the statistic tensors themselves after :meth:`flush`.
        """
        self._deferred.push(statistics, has_variance)

    def flush(self) -> None:
        """Apply every batch queued by :meth:`record_async` (waiting for their copies to the host)."""
        self._deferred.flush()

    @property
    def num_pending(self) -> int:
        """Batches queued by :meth:`record_async` and not applied yet."""
        return len(self._deferred)

    def _record(
        self,
        indices: torch.Tensor,
        correct: torch.Tensor,
        loss: torch.Tensor,
        cls_attention_variance: torch.Tensor | None,
    ) -> None:
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
        self.samples_recorded += count
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
        self.flush()
        seen = self.presentations > 0
        ever_seen = self.last_correct >= 0
        finite_loss = torch.isfinite(self.last_loss)
        num_seen = int(seen.sum())
        planned = [size for size in self._epoch_sizes if size >= 0]
        return {
            "epoch": float(self._epoch),
            "active_fraction": self.epoch_size / self.num_examples,
            # upstream InfoBatch's "saved sample forwarding": examples left out of the epochs planned so far
            "examples_pruned": float(sum(self.num_examples - size for size in planned)),
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
        weights) and scalars (identity and the current epoch), every queued record applied."""
        self.flush()
        state: dict[str, StateValue] = {
            "method": self.method,
            "format_version": FORMAT_VERSION,
            "num_examples": self.num_examples,
            "epoch_size": self._epoch_size,
            "seed": self.seed,
            "epoch": self._epoch,
            "samples_recorded": self.samples_recorded,
            "last_correct": self.last_correct.clone(),
            "forgetting_count": self.forgetting_count.clone(),
            "ever_correct": self.ever_correct.clone(),
            "presentations": self.presentations.clone(),
            "cls_attention_variance": self.cls_attention_variance.clone(),
            "last_loss": self.last_loss.clone(),
            "epoch_order": self._order.clone(),
            "epoch_sizes": torch.tensor(self._epoch_sizes, dtype=torch.int64),
            "optimizer_steps_per_epoch": torch.tensor(self._optimizer_steps, dtype=torch.int64),
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
        """Restore a :meth:`state_dict`; the identity (method, size, epoch size, seed) must match.
        Records still queued by :meth:`record_async` are dropped: the restored state replaces them."""
        state_dict = _migrate(state_dict)
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
        if epoch < 0:
            sizes_allowed = order.numel() == 0
        elif self.fixed_epoch_size:
            sizes_allowed = order.numel() == self._epoch_size
        else:
            sizes_allowed = 0 < order.numel() <= self.num_examples
        if not sizes_allowed:
            raise ValueError(f"state_dict['epoch_order'] has {order.numel()} entries for epoch {epoch}.")
        # absent from states of format 1: the sizes of the epochs before the current one are unknown there
        epoch_sizes = state_dict.get("epoch_sizes")
        if epoch_sizes is None:
            epoch_sizes = [-1] * epoch + [order.numel()] if epoch >= 0 else []
        else:
            epoch_sizes = torch.as_tensor(epoch_sizes).tolist()
        optimizer_steps = torch.as_tensor(state_dict.get("optimizer_steps_per_epoch", [])).tolist()
        weights = state_dict.get("epoch_weights")
        self.samples_recorded = int(state_dict.get("samples_recorded", 0))
        self._deferred.clear()
        self._epoch, self._order = epoch, order
        self._epoch_sizes = [int(size) for size in epoch_sizes]
        self._optimizer_steps = [int(steps) for steps in optimizer_steps]
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
        saved = read_saved(directory, prefix)
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


def read_saved(directory: str | os.PathLike, prefix: str) -> dict[str, Any]:
    directory = Path(directory)
    tensor_path, json_path = directory / f"{prefix}.safetensors", directory / f"{prefix}.json"
    missing = [str(path) for path in (tensor_path, json_path) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Example pruning state not found: missing {missing}.")
    with open(json_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    saved["state"] = _migrate({**saved["state"], **load_file(str(tensor_path))})
    saved["method"] = saved["state"]["method"]
    return saved


def _migrate(state: Mapping[str, StateValue]) -> Mapping[str, StateValue]:
    """States of format 1 named the fixed-size InfoBatch mode "infobatch": they load as "infobatch_fixed_size"."""
    if int(state.get("format_version", 1)) < 2 and state.get("method") == "infobatch":
        return {**state, "method": "infobatch_fixed_size"}
    return state
