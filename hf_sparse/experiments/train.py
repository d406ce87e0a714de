"""`hf-sparse train METHOD CONFIG.yaml [--field value ...]`: the recipes' training, shipped in the package.

    hf-sparse train tri-level CONFIG.yaml [--field value ...]
    hf-sparse train tost CONFIG.yaml --mask_method grasp --sparsity 0.95
    accelerate launch [--config_file ACCELERATE.yaml] -m hf_sparse.experiments.train tri-level CONFIG.yaml [...]

The YAML holds fields of `ModelArguments`, `DataArguments` (`experiments/common.py`) and the method's training
arguments (`TriLevelTrainingArguments`, `ToSTTrainingArguments`); command-line flags override it, and a run without a
YAML takes the fields' defaults. `recipes/tri_level.py` and `recipes/tost.py` in the repository are thin scripts over
`main_tri_level` / `main_tost`, as TRL's scripts are over its CLI. An input error (an unknown field, a bad value, a
missing file or folder) ends in one line on stderr and exit status 2 (`HF_SPARSE_TRACEBACK=1` shows the traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..tost import ToSTTrainer, ToSTTrainingArguments, sparsity_report
from ..tri_level import TriLevelTrainer, TriLevelTrainingArguments
from ..validation import check_choice
from .common import train_from_config


def sparsity_metrics(trainer) -> dict[str, float]:
    """ToST: the measured weight sparsity, beside the evaluation metrics."""
    report = sparsity_report(trainer.model)
    return {"eval_prunable_sparsity": report["prunable_sparsity"], "eval_total_sparsity": report["total_sparsity"]}


@dataclass(frozen=True)
class Recipe:
    """A method's trainer, its training arguments, extra evaluation metrics and its one-line description."""

    trainer_class: type
    arguments_class: type
    metrics: Callable | None
    help: str


RECIPES: dict[str, Recipe] = {
    "tri-level": Recipe(
        TriLevelTrainer, TriLevelTrainingArguments, None,
        "Tri-Level E-ViT: example pruning, token pruning and attention sparsity (the final keep ratios become the "
        "model's own).",
    ),
    "tost": Recipe(
        ToSTTrainer, ToSTTrainingArguments, sparsity_metrics,
        "ToST: a weight mask trained with ghost neurons/skips, rescaled init and label smoothing (the saved model has "
        "the exact zeros and sparsity_masks.safetensors).",
    ),
}


def train(method: str, argv: list[str]):
    """Parse `CONFIG.yaml [--field value ...]` for `method`, train, evaluate and save; returns the trainer."""
    recipe = RECIPES[check_choice("method", method, list(RECIPES))]
    return train_from_config(recipe.trainer_class, recipe.arguments_class, list(argv), metrics=recipe.metrics,
                             prog=f"hf-sparse train {method}")


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_sparse.experiments.train METHOD CONFIG ...` (what `accelerate launch -m` runs on each process):
    `hf-sparse train` with the command line's error handling (one line and exit 2 on bad input)."""
    from ..cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


def main_tri_level(argv: list[str] | None = None) -> int:
    """`recipes/tri_level.py`: `hf-sparse train tri-level` with the script's arguments."""
    return main(["tri-level", *(sys.argv[1:] if argv is None else argv)])


def main_tost(argv: list[str] | None = None) -> int:
    """`recipes/tost.py`: `hf-sparse train tost` with the script's arguments."""
    return main(["tost", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
