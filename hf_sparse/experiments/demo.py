"""`hf-sparse demo`: the main job. From the same initial weights on Fashion-MNIST, trains
  1. a dense ViT (transformers' own) for the given epochs,
  2. a Tri-Level SparseViT for the same epochs,
  3. a dense ViT budget-matched to the Tri-Level run's wall-clock (its own cosine schedule fully decayed), and
  4. the random-dropping alternative a user already has: the same run with CLS-attention token pruning replaced by
     PatchDropout (random patches dropped once after the embedding) at the same training FLOPs,
then prints a table (test accuracy, evaluated pruned and with all tokens, training wall-clock, images trained, time
saved, the delta against both dense runs) and writes `results.json` (each run with its `role`), a plot of test
accuracy against wall-clock, and the patches the Tri-Level model kept on a few test images with the share of them on
the object. One seed: `hf-sparse bench e2e` gives medians.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..hub import save_for_hub
from ..models.sparse_vit import SparseViTForImageClassification
from ..tri_level import TriLevelTrainer
from ..tri_level.arguments import EXAMPLE_PRUNING_METHODS
from ..validation import check_choice, check_fraction, check_int, check_positive
from .common import DataArguments, ModelArguments, build_dense_vit, prepare_data, training_fields
from .plots import kept_patches_on_object, plot_accuracy_against_time, plot_kept_patches
from .runs import (
    RunResult,
    Variant,
    budget_matched_steps,
    token_level_accuracies,
    train_dense,
    train_one,
    train_tri_level,
    tri_level_run,
)


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the table, plots and model go."})
    dataset_name: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist' or a local image folder."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs of each run."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    evaluations: int = field(default=3, metadata={"help": "Test-set evaluations per run (for the curve), >= 1."})
    # The defaults are the setting that won `hf-sparse bench e2e` over 3 seeds (README): token pruning alone.
    example_pruning: str = field(
        default="none", metadata={"help": "Tri-Level level 1.", "choices": ["forgetting", "infobatch", "infobatch_fixed_size", "random", "none"]}
    )
    example_inactive_fraction: float | None = field(default=None, metadata={"help": "None: the method's default."})
    token_keep_ratio: float = field(default=0.5, metadata={"help": "Tri-Level level 2 (final ratio)."})
    attention_keep_ratio: float = field(default=1.0, metadata={"help": "Tri-Level level 3 (final ratio)."})
    max_train_samples: int | None = field(
        default=30_000,
        metadata={"help": "Train on a seeded subset (0: all 60,000): sized so the job takes about 10 min."},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first examples only."})
    patch_dropout_alternative: bool = field(default=True, metadata={
        "help": "Also train PatchDropout at the Tri-Level run's training FLOPs (the random-dropping alternative; "
                "only with token pruning)."})
    seed: int = field(default=42, metadata={"help": "Initial weights and data order of every run."})

    image_column: str | None = field(default=None, metadata={"help": "Image column (default: found by type)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: found by type)."})

    def __post_init__(self):
        # Every value is checked here or (what depends on the data: the patch size) before the first run trains.
        check_positive("epochs", self.epochs)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("evaluations", self.evaluations, minimum=1)
        check_choice("example_pruning", self.example_pruning, EXAMPLE_PRUNING_METHODS)
        if self.example_inactive_fraction is not None:
            check_fraction("example_inactive_fraction", self.example_inactive_fraction)
        for name in ("token_keep_ratio", "attention_keep_ratio"):
            check_fraction(name, getattr(self, name), low_inclusive=False, high_inclusive=True)
        if self.max_train_samples is not None:
            check_int("max_train_samples", self.max_train_samples, minimum=0)
        if self.max_eval_samples is not None:
            check_int("max_eval_samples", self.max_eval_samples, minimum=1)


ARGUMENTS = (DemoArguments, ModelArguments)


def describe_levels(args: DemoArguments) -> str:
    """The levels that are on, for the table and the plot: "tokens 0.5", "infobatch 0.3 + tokens 0.5" ..."""
    levels = []
    if args.example_pruning != "none":
        fraction = args.example_inactive_fraction
        levels.append(args.example_pruning + ("" if fraction is None else f" {fraction:g}"))
    if args.token_keep_ratio < 1.0:
        levels.append(f"tokens {args.token_keep_ratio:g}")
    if args.attention_keep_ratio < 1.0:
        levels.append(f"attention {args.attention_keep_ratio:g}")
    return " + ".join(levels) or "no sparsity"


def format_table(results: list[RunResult]) -> str:
    dense, matched = results[0], results[1]

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    width = max(34, *(len(result.name) for result in results))
    lines = [f"{'run':<{width}} {'test acc %':>10} {'pruned %':>9} {'all tokens %':>12} {'train s':>8} "
             f"{'images':>9} {'time saved':>10} {'vs dense':>9} {'vs matched':>10}"]
    for result in results:
        saved = 100 * (1.0 - result.train_seconds / dense.train_seconds)
        lines.append(
            f"{result.name:<{width}} {100 * result.accuracy:>10.2f} {percent(result.pruned_accuracy):>9} "
            f"{percent(result.all_tokens_accuracy):>12} {result.train_seconds:>8.1f} {result.images_trained:>9d} "
            f"{saved:>9.1f}% {100 * (result.accuracy - dense.accuracy):>+9.2f} "
            f"{100 * (result.accuracy - matched.accuracy):>+10.2f}"
        )
    lines.append("('test acc': each model as it is configured (PatchDropout: all tokens); 'pruned': CLS-attention "
                 "selection at the Tri-Level token keep ratio; 'all tokens': every patch)")
    return "\n".join(lines)


def patch_selection_report(tri_level_model, dense_model, model_args, data, seed: int) -> dict[str, dict[str, float]]:
    """Does CLS attention find the object? The fraction of kept patches on it after each pruning layer, for the
    Tri-Level model, for the dense-trained ViT pruned with the same ratios (attention of a model that never dropped
    tokens) and for the untrained initial weights (chance), beside the fraction of all patches on the object."""
    config = tri_level_model.config
    ratios = dict(token_keep_ratio=config.token_keep_ratio, token_pruning_layers=config.token_pruning_layers)
    models = {
        "tri_level": tri_level_model,
        "dense_trained_pruned_after": SparseViTForImageClassification.from_vit(dense_model, **ratios),
        "untrained": SparseViTForImageClassification.from_vit(build_dense_vit(model_args, data, seed), **ratios),
    }
    report = {name: kept_patches_on_object(model, data) for name, model in models.items()}
    for name, values in report.items():
        print(f"patches on the object ({name}): " + ", ".join(f"{key} {100 * value:.0f} %"
                                                             for key, value in values.items()))
    return report


def main(args: DemoArguments, model_args: ModelArguments) -> list[RunResult]:
    data = prepare_data(
        DataArguments(dataset_name=args.dataset_name, max_train_samples=args.max_train_samples or None,
                      max_eval_samples=args.max_eval_samples, image_column=args.image_column,
                      label_column=args.label_column),
        seed=args.seed,
    )
    fields = training_fields(args.output_dir, args.epochs, args.batch_size, args.seed, args.evaluations)
    variant = Variant(f"Tri-Level SparseViT ({describe_levels(args)})", args.example_pruning, args.token_keep_ratio,
                      args.attention_keep_ratio, args.example_inactive_fraction)
    alternative = None
    if args.patch_dropout_alternative and args.token_keep_ratio < 1.0:
        alternative = Variant("PatchDropout (random patches, same training FLOPs)", args.example_pruning,
                              attention_keep_ratio=args.attention_keep_ratio,
                              inactive_fraction=args.example_inactive_fraction,
                              patch_dropout_matched_to=args.token_keep_ratio)
    # The models and arguments first: a value they refuse fails before the dense run trains or writes.
    tri_name, tri_model, tri_args = tri_level_run(data, model_args, args.seed, fields, variant)
    if alternative is not None:
        tri_level_run(data, model_args, args.seed, fields, alternative)
    os.makedirs(args.output_dir, exist_ok=True)

    dense, dense_trainer = train_dense(data, model_args, args.seed, fields, name="dense ViT")
    tri, tri_trainer = train_one(tri_name, TriLevelTrainer, tri_model, tri_args, data, role="tri_level")
    tri.pruned_accuracy, tri.all_tokens_accuracy = token_level_accuracies(tri_trainer, variant, tri.accuracy)
    matched = train_dense(data, model_args, args.seed, fields, name="dense ViT, budget-matched",
                          max_steps=budget_matched_steps(dense, tri.train_seconds), role="dense_budget_matched")[0]
    results = [dense, matched, tri]
    if alternative is not None:
        patch_dropout = train_tri_level(data, model_args, args.seed, fields, alternative)[0]
        patch_dropout.role = "patch_dropout"
        results.append(patch_dropout)

    print("\n" + format_table(results))
    title = f"{data.name}: dense ViT, Tri-Level SparseViT{', PatchDropout' if alternative else ''} (seed {args.seed})"
    plot_accuracy_against_time(results, os.path.join(args.output_dir, "accuracy_vs_wall_clock.png"), title,
                               num_classes=len(data.label_names))
    plot_kept_patches(tri_trainer.model, data, os.path.join(args.output_dir, "kept_patches.png"))
    on_object = patch_selection_report(tri_trainer.model, dense_trainer.model, model_args, data, args.seed)
    final = os.path.join(args.output_dir, "tri_level", "final")
    report = tri_trainer.training_report(dataset=data.name, dense_train_seconds=dense.train_seconds)
    report.train_seconds = tri.train_seconds
    save_for_hub(tri_trainer.model, final, report=report, image_processor=data.image_processor())
    tri_trainer.save_method_state(final)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"runs": [asdict(r) for r in results], "arguments": {**asdict(args), **asdict(model_args)},
                   "dense_steps_per_second": dense.steps / dense.train_seconds,
                   "kept_patches_on_object": on_object}, handle, indent=2)
    print(f"\nWrote {args.output_dir}/results.json, accuracy_vs_wall_clock.png, kept_patches.png and the Tri-Level "
          f"model in {final}")
    return results
