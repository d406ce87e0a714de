"""A batch's per-example statistics packed into one tensor, and the queue that brings them to the host without waiting.

One layout, shared by the trainer and the pruner: a ``(B, NUM_STATISTICS)`` float64 tensor whose columns are
``INDEX_COLUMN`` (dataset index), ``CORRECT_COLUMN`` (1 right, 0 wrong), ``LOSS_COLUMN`` (per-sample loss) and
``VARIANCE_COLUMN`` (CLS-attention variance, NaN when the model gives none). float64 holds every index below 2**53
exactly, so the batch crosses ranks in one gather and reaches the host in one copy. :func:`pack_statistics` builds it
(on the device, without a sync); :class:`DeferredRecords` starts its copy to the host non-blocking and hands the
columns to the pruner's record function in order once the copy is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

INDEX_COLUMN, CORRECT_COLUMN, LOSS_COLUMN, VARIANCE_COLUMN = range(4)
NUM_STATISTICS = 4

# (indices, correct, loss, cls_attention_variance or None): what `ExamplePruner._record` takes
RecordFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


def pack_statistics(
    indices: torch.Tensor,
    correct: torch.Tensor,
    loss: torch.Tensor,
    cls_attention_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """One batch's statistics as a ``(B, NUM_STATISTICS)`` float64 tensor on ``loss``'s device (detached; a missing
    variance is NaN)."""
    if cls_attention_variance is None:
        cls_attention_variance = torch.full_like(loss, float("nan"))
    columns = (indices, correct, loss, cls_attention_variance)  # in the order of the *_COLUMN constants
    return torch.stack(
        [column.detach().reshape(-1).to(device=loss.device, dtype=torch.float64) for column in columns], dim=1
    )


class _PendingRecord(NamedTuple):
    """A batch's statistics on their way to the host: `DeferredRecords.push` queued them, `apply_ready`/`flush`
    apply them."""

    statistics: torch.Tensor  # (B, NUM_STATISTICS) float64 on the host; filled once `copied` is done
    copied: torch.Event | None  # None: already on the host
    has_variance: bool

    def ready(self) -> bool:
        return self.copied is None or self.copied.query()


class DeferredRecords:
    """Packed statistics queued for a record function, applied oldest first once their copy to the host is done.

    Nothing here waits for the device except :meth:`flush`: :meth:`push` starts the copy and applies whatever is
    already on the host, so the record function sees the batches in the order they were pushed.
    """

    def __init__(self, record: RecordFunction) -> None:
        self._record = record
        self._pending: list[_PendingRecord] = []  # oldest first

    def __len__(self) -> int:
        """Batches pushed and not applied yet."""
        return len(self._pending)

    def push(self, statistics: torch.Tensor, has_variance: bool) -> None:
        """Queue packed statistics (see :func:`pack_statistics`; ``has_variance`` False: the variance column is
        ignored), starting their copy to the host without blocking, then apply every batch that is ready."""
        if statistics.dim() != 2 or statistics.shape[1] != NUM_STATISTICS or statistics.dtype != torch.float64:
            raise ValueError(f"statistics must be float64 of shape (batch, {NUM_STATISTICS}) (see pack_statistics), "
                             f"got {statistics.dtype} of shape {tuple(statistics.shape)}.")
        statistics = statistics.detach()
        if statistics.device.type == "cpu":
            self._pending.append(_PendingRecord(statistics, None, has_variance))
        else:
            host = statistics.to("cpu", non_blocking=True)  # pinned by torch for CUDA sources
            copied = torch.Event(device=statistics.device)
            copied.record()
            self._pending.append(_PendingRecord(host, copied, has_variance))
        self._apply(wait=False)

    def flush(self) -> None:
        """Apply every queued batch, waiting for their copies to the host."""
        self._apply(wait=True)

    def clear(self) -> None:
        """Drop every queued batch unapplied (a loaded state replaces them)."""
        self._pending.clear()

    def _apply(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].ready()):
            pending = self._pending.pop(0)
            if pending.copied is not None:
                pending.copied.synchronize()
            columns = pending.statistics
            self._record(
                columns[:, INDEX_COLUMN],
                columns[:, CORRECT_COLUMN] != 0,
                columns[:, LOSS_COLUMN],
                columns[:, VARIANCE_COLUMN] if pending.has_variance else None,
            )
