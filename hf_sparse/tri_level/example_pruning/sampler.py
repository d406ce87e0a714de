"""The sampler that feeds a pruner's epochs to the Trainer, and the wrapper that tells the step which examples it got."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, Sampler

from ...validation import check_int
from .pruner import ExamplePruner

EXAMPLE_INDEX = "example_index"


class ExamplePruningSampler(Sampler[int]):
    """A ``torch`` sampler that yields ``pruner.epoch_indices(epoch)``.

    ``len()`` is ``pruner.epoch_size``: constant for the fixed-size methods; for InfoBatch, whose epochs vary, the size
    of the epoch planned last, so a loop that needs an epoch's length first plans it (``pruner.epoch_indices(epoch)``,
    once the previous epoch's statistics are all recorded), as `TriLevelTrainer` does. Planning never happens in
    ``len()``: a data loader's prefetching would plan an epoch before the last batches of the one before were
    trained.

    Every process iterates the same order, so accelerate's batch sharding splits it without overlap. The epoch comes
    from :meth:`set_epoch` (the Trainer and accelerate call it); a completed pass also advances it, like accelerate's
    ``SeedableRandomSampler``, so a loop that never calls ``set_epoch`` still gets a new epoch each pass.
    """

    def __init__(self, pruner: ExamplePruner, epoch: int = 0) -> None:
        self.pruner = pruner
        self.epoch = check_int("epoch", epoch, minimum=0)

    def __len__(self) -> int:
        return self.pruner.epoch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, minimum=0)

    def __iter__(self) -> Iterator[int]:
        # Plan when iteration starts: all of the previous epoch's records are in by then.
        order = self.pruner.epoch_indices(self.epoch).tolist()
        yield from order
        self.epoch += 1


class IndexedDataset(Dataset):
    """Adds each example's position in the training set (`example_index`), so statistics can be recorded per
    example."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item[EXAMPLE_INDEX] = index
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # Batched fetch, so a `with_transform` data set transforms a whole batch at once (as without the wrapper).
        if hasattr(self.dataset, "__getitems__"):
            items = [dict(item) for item in self.dataset.__getitems__(indices)]
        else:
            items = [dict(self.dataset[index]) for index in indices]
        for item, index in zip(items, indices):
            item[EXAMPLE_INDEX] = index
        return items
