"""Level 1 of Tri-Level E-ViT: which training examples each epoch uses (`pruner.py` the base, `methods.py` the
methods, `sampler.py` what feeds them to the Trainer, `deferred.py` the packed per-batch statistics and the queue that
brings them to the host without waiting)."""

from .deferred import DeferredRecords, pack_statistics
from .methods import (
    EXAMPLE_PRUNERS,
    TIE_BREAKS,
    ForgettingExamplePruner,
    InfoBatchExamplePruner,
    InfoBatchFixedSizeExamplePruner,
    NoExamplePruner,
    RandomExamplePruner,
    build_example_pruner,
    load_example_pruner,
    plan_refresh_epochs,
)
from .pruner import ExamplePruner
from .sampler import EXAMPLE_INDEX, ExamplePruningSampler, IndexedDataset


__all__ = [
    "EXAMPLE_INDEX",
    "EXAMPLE_PRUNERS",
    "TIE_BREAKS",
    "DeferredRecords",
    "ExamplePruner",
    "ExamplePruningSampler",
    "ForgettingExamplePruner",
    "IndexedDataset",
    "InfoBatchExamplePruner",
    "InfoBatchFixedSizeExamplePruner",
    "NoExamplePruner",
    "RandomExamplePruner",
    "build_example_pruner",
    "load_example_pruner",
    "pack_statistics",
    "plan_refresh_epochs",
]
