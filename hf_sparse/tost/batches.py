"""Batches and default losses for the ToST techniques that read data (mask scores, GradInit, lottery-ticket rounds)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""`loss_fn(model, batch) -> scalar loss`. It must call `model(...)` so that callers can swap parameters."""


def take_batches(batches: Iterable[Any] | None, num_batches: int | None, argument: str = "batches") -> list[Any]:
    """The first `num_batches` batches of `batches` (all of them when `num_batches` is None)."""
    if batches is None:
        raise ValueError(f"`{argument}` is required: pass an iterable of batches (a list or a DataLoader).")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"`num_batches` must be a positive integer or None, got {num_batches!r}.")
    taken = []
    for batch in batches:
        taken.append(batch)
        if num_batches is not None and len(taken) >= num_batches:
            break
    if not taken:
        raise ValueError(f"`{argument}` yielded no batch.")
    return taken


class BatchCycler:
    """Draws batches forever: restarts a re-iterable source (list, DataLoader); a spent one-shot iterator errors."""

    def __init__(self, batches: Iterable[Any], argument: str = "batches") -> None:
        self._source = batches
        self._argument = argument
        self._one_shot = isinstance(batches, Iterator)
        self._iterator = iter(batches)
        self.drawn = 0

    def next(self) -> Any:
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self._one_shot or self.drawn == 0:
                raise ValueError(
                    f"`{self._argument}` ran out after {self.drawn} batches; pass a re-iterable source "
                    "(a list or a DataLoader) or a longer iterator."
                ) from None
            self._iterator = iter(self._source)
            batch = next(self._iterator)
        self.drawn += 1
        return batch


def model_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a `ModelOutput` with `.logits`, or a tuple whose first item is them."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(outputs).__name__}.")


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError("A dict batch needs a `labels` entry (or pass a `loss_fn`).")
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Unsupported batch type {type(batch).__name__}: use a dict with `labels` or an (inputs, labels) pair, "
        "or pass a `loss_fn(model, batch)`."
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call `model` on a dict of keyword inputs or on a single positional input."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def classification_loss(model: nn.Module, batch: Any, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of `logits / temperature` against the batch's labels (GraSP uses temperature 200)."""
    inputs, labels = _split_batch(batch)
    logits = model_logits(call_model(model, inputs))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32, fp64 stays fp64
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]) / temperature, labels.reshape(-1))


def default_loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's own `.loss` for dict batches with labels (HF style), else cross-entropy on (inputs, labels)."""
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is None:
            raise ValueError("The model returned no `loss` for this batch: include `labels` or pass a `loss_fn`.")
        return loss
    return classification_loss(model, batch)


def example_inputs_from_batch(batch: Any) -> Any:
    """Strip labels from a batch and keep its inputs (used to build SynFlow's all-ones input)."""
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if key != "labels"}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch


class SeededBatches:
    """Re-iterable training batches in a seeded order, independent of the Trainer's sampler and of the global RNG:
    each pass is the next epoch of that order (the same on every rank). `prepare` moves a batch to the device."""

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable[[list[Any]], Any],
        batch_size: int,
        seed: int,
        prepare: Callable[[Any], Any] = lambda batch: batch,
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.seed = seed
        self.prepare = prepare
        self._epoch = 0

    def __iter__(self) -> Iterator[Any]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        self._epoch += 1
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, collate_fn=self.collate_fn, num_workers=0
        )
        for batch in loader:
            yield self.prepare(batch)
