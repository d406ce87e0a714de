"""Tri-Level E-ViT (Kong et al., AAAI 2023) outside the model: example pruning (level 1, `example_pruning/`), the
schedule of the token and attention keep ratios (levels 2-3, `schedule.py`; the levels themselves are SparseViT's),
and the `TriLevelTrainingArguments` + `TriLevelTrainer` pair."""

from .arguments import EXAMPLE_PRUNING_METHODS, TriLevelTrainingArguments
from .example_pruning import (
    EXAMPLE_INDEX,
    EXAMPLE_PRUNERS,
    ExamplePruner,
    ExamplePruningSampler,
    ForgettingExamplePruner,
    IndexedDataset,
    InfoBatchExamplePruner,
    InfoBatchFixedSizeExamplePruner,
    NoExamplePruner,
    RandomExamplePruner,
    build_example_pruner,
    load_example_pruner,
    plan_refresh_epochs,
)
from .schedule import KeepRatioSchedule, KeepRatioScheduleCallback
from .trainer import TriLevelTrainer


__all__ = [
    "EXAMPLE_INDEX",
    "EXAMPLE_PRUNERS",
    "EXAMPLE_PRUNING_METHODS",
    "ExamplePruner",
    "ExamplePruningSampler",
    "ForgettingExamplePruner",
    "IndexedDataset",
    "InfoBatchExamplePruner",
    "InfoBatchFixedSizeExamplePruner",
    "KeepRatioSchedule",
    "KeepRatioScheduleCallback",
    "NoExamplePruner",
    "RandomExamplePruner",
    "TriLevelTrainer",
    "TriLevelTrainingArguments",
    "build_example_pruner",
    "load_example_pruner",
    "plan_refresh_epochs",
]
