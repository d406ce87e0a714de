"""`hf-sparse demo`: the main job. Trains a dense ViT and a Tri-Level SparseViT from the same initial weights on
Fashion-MNIST with the same epochs and hyper-parameters, then prints a table (test accuracy, training wall-clock,
images trained, time saved) and writes two plots: test accuracy against wall-clock, and the patches the Tri-Level
model kept on a few test images.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from transformers import Trainer, TrainingArguments

from ..hub import save_for_hub
from ..tri_level import TriLevelTrainer, TriLevelTrainingArguments
from .common import DataArguments, ModelArguments, build_dense_vit, build_sparse_vit, prepare_data, training_fields
from .plots import plot_accuracy_against_time, plot_kept_patches
from .runs import RunResult, format_table, train_one


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the table, plots and model go."})
    dataset_name: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist' or a local image folder."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs of each run."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    evaluations: int = field(default=4, metadata={"help": "Test-set evaluations per run (for the curve), >= 1."})
    example_pruning: str = field(
        default="forgetting", metadata={"help": "Tri-Level level 1.", "choices": ["forgetting", "infobatch", "random", "none"]}
    )
    example_inactive_fraction: float | None = field(default=None, metadata={"help": "Default: the method's."})
    token_keep_ratio: float = field(default=0.7, metadata={"help": "Tri-Level level 2 (final ratio)."})
    attention_keep_ratio: float = field(default=1.0, metadata={"help": "Tri-Level level 3 (final ratio)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded subset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first examples only."})
    seed: int = field(default=42, metadata={"help": "Initial weights and data order of both runs."})

    def __post_init__(self):
        if self.evaluations < 1:
            raise ValueError(f"`evaluations` must be >= 1, got {self.evaluations}.")


ARGUMENTS = (DemoArguments, ModelArguments)


def main(args: DemoArguments, model_args: ModelArguments) -> list[RunResult]:
    os.makedirs(args.output_dir, exist_ok=True)
    data = prepare_data(
        DataArguments(dataset_name=args.dataset_name, max_train_samples=args.max_train_samples,
                      max_eval_samples=args.max_eval_samples),
        seed=args.seed,
    )
    dense_model = build_dense_vit(model_args, data, args.seed)
    # Same initial weights for both runs: SparseViT is converted from the untrained dense model.
    sparse_model = build_sparse_vit(
        model_args, data, args.seed, args.token_keep_ratio, args.attention_keep_ratio, from_dense=dense_model
    )
    common = training_fields(args.output_dir, args.epochs, args.batch_size, args.seed, args.evaluations)

    dense_args = TrainingArguments(**{**common, "output_dir": os.path.join(args.output_dir, "dense")})
    dense, _ = train_one("dense ViT", Trainer, dense_model, dense_args, data)

    tri_args = TriLevelTrainingArguments(
        **{**common, "output_dir": os.path.join(args.output_dir, "tri_level")},
        example_pruning=args.example_pruning,
        example_inactive_fraction=args.example_inactive_fraction,
    )
    tri, tri_trainer = train_one("Tri-Level SparseViT", TriLevelTrainer, sparse_model, tri_args, data)
    results = [dense, tri]

    print("\n" + format_table(results))
    title = f"{data.name}: dense ViT vs Tri-Level SparseViT"
    plot_accuracy_against_time(results, os.path.join(args.output_dir, "accuracy_vs_wall_clock.png"), title,
                               num_classes=len(data.label_names))
    plot_kept_patches(tri_trainer.model, data, os.path.join(args.output_dir, "kept_patches.png"))
    final = os.path.join(args.output_dir, "tri_level", "final")
    report = tri_trainer.training_report(dataset=data.name, dense_train_seconds=dense.train_seconds)
    report.train_seconds = tri.train_seconds
    save_for_hub(tri_trainer.model, final, report=report, image_processor=data.image_processor())
    tri_trainer.save_method_state(final)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"runs": [r.__dict__ for r in results], "arguments": {**asdict(args), **asdict(model_args)}},
                  handle, indent=2)
    print(f"\nWrote {args.output_dir}/results.json, accuracy_vs_wall_clock.png, kept_patches.png and the Tri-Level "
          f"model in {final}")
    return results
