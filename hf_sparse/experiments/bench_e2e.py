"""`hf-sparse bench e2e`: end-to-end training time and accuracy of each level of Tri-Level E-ViT, alone and
together, and of InfoBatch-style data pruning, against a dense HF ViT trained side by side (same initial weights,
epochs, hyper-parameters and seed) on Fashion-MNIST.

Runs are sequential (one training at a time on the machine), so a noisy neighbour can shift one run: repeat with
`--repeats` to get medians.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field

from transformers import Trainer, TrainingArguments

from ..tri_level import TriLevelTrainer, TriLevelTrainingArguments
from .common import DataArguments, ModelArguments, build_dense_vit, build_sparse_vit, prepare_data, training_fields
from .plots import plot_accuracy_against_time
from .runs import RunResult, format_table, train_one


@dataclass
class E2EVariant:
    name: str
    example_pruning: str | None  # None: the dense HF ViT with the plain Trainer
    token_keep_ratio: float = 1.0
    attention_keep_ratio: float = 1.0
    inactive_fraction: float | None = None


VARIANTS = {
    "dense": E2EVariant("dense ViT", None),
    "tri_level": E2EVariant("Tri-Level (all three)", "forgetting", 0.7, 0.5),
    "tri_level_no_attention": E2EVariant("Tri-Level (data+tokens)", "forgetting", 0.7, 1.0),
    "data_only": E2EVariant("data: forgetting", "forgetting"),
    "tokens_only": E2EVariant("tokens 0.7", "none", 0.7),
    "attention_only": E2EVariant("attention 0.5", "none", 1.0, 0.5),
    "infobatch": E2EVariant("data: InfoBatch", "infobatch", inactive_fraction=0.3),
    "infobatch_tokens": E2EVariant("InfoBatch+tokens", "infobatch", 0.7, 1.0, inactive_fraction=0.3),
}


@dataclass
class E2EArguments:
    output_dir: str = field(default="outputs/bench_e2e", metadata={"help": "Where runs, table and plot go."})
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": "Variants to run.", "choices": list(VARIANTS)}
    )
    repeats: int = field(default=1, metadata={"help": "Runs of each variant (interleaved), for medians."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs of each run."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    evaluations: int = field(default=2, metadata={"help": "Test-set evaluations per run (for the curve)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded subset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first examples only."})
    seed: int = field(default=42, metadata={"help": "Initial weights and data order."})
    json: str | None = field(default=None, metadata={"help": "Results file (default <output_dir>/bench_e2e.json)."})


ARGUMENTS = (E2EArguments, ModelArguments)


def run_variant(key: str, args: E2EArguments, data, model_args: ModelArguments) -> RunResult:
    variant = VARIANTS[key]
    dense_model = build_dense_vit(model_args, data, args.seed)
    common = training_fields(os.path.join(args.output_dir, key), args.epochs, args.batch_size, args.seed,
                             args.evaluations)
    if variant.example_pruning is None:
        return train_one(variant.name, Trainer, dense_model, TrainingArguments(**common), data)[0]
    model = build_sparse_vit(
        model_args, data, args.seed, variant.token_keep_ratio, variant.attention_keep_ratio, from_dense=dense_model
    )
    training_args = TriLevelTrainingArguments(
        **common, example_pruning=variant.example_pruning, example_inactive_fraction=variant.inactive_fraction
    )
    return train_one(variant.name, TriLevelTrainer, model, training_args, data)[0]


def main(args: E2EArguments, model_args: ModelArguments) -> list[dict]:
    keys = ["dense"] + [k for k in args.variants if k != "dense"]  # ratios are against the dense run
    os.makedirs(args.output_dir, exist_ok=True)
    data = prepare_data(
        DataArguments(max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples), seed=args.seed
    )
    runs: dict[str, list[RunResult]] = {key: [] for key in keys}
    for _ in range(args.repeats):
        for key in keys:  # interleaved across repeats
            runs[key].append(run_variant(key, args, data, model_args))
    medians = [
        RunResult(
            name=results[0].name,
            accuracy=statistics.median(r.accuracy for r in results),
            train_seconds=statistics.median(r.train_seconds for r in results),
            images_trained=results[0].images_trained,
            curve=results[0].curve,
        )
        for results in runs.values()
    ]
    print(f"\nFashion-MNIST, {args.epochs} epochs, median of {args.repeats} run(s) each:")
    print(format_table(medians))
    plot_accuracy_against_time(medians, os.path.join(args.output_dir, "accuracy_vs_wall_clock.png"),
                               f"{data.name}: dense vs Tri-Level variants")
    dense = medians[0]
    rows = [
        {
            "variant": key,
            "name": result.name,
            "test_accuracy": result.accuracy,
            "train_seconds": result.train_seconds,
            "images_trained": result.images_trained,
            "time_saved": 1.0 - result.train_seconds / dense.train_seconds,
            "accuracy_delta_points": 100 * (result.accuracy - dense.accuracy),
            "runs": [r.__dict__ for r in runs[key]],
        }
        for key, result in zip(keys, medians)
    ]
    path = args.json or os.path.join(args.output_dir, "bench_e2e.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"arguments": {**asdict(args), **asdict(model_args)}, "rows": rows}, handle, indent=2)
    return rows
