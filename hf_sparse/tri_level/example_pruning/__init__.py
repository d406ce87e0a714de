"""Level 1 of Tri-Level E-ViT: which training examples each epoch uses (`pruner.py` the base, `methods.py` the
methods, `sampler.py` what feeds them to the Trainer)."""

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
    "plan_refresh_epochs",
]
