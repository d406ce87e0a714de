"""`hf-sparse bench e2e`: end-to-end training time and accuracy of each level of Tri-Level E-ViT, alone and
together, and of InfoBatch-style data pruning, against a dense HF ViT trained side by side (same initial weights,
epochs, hyper-parameters and seed) on Fashion-MNIST.

Runs are sequential (one training at a time on the machine), so a noisy neighbour can shift one run: repeat with
`--repeats` to get medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass

from transformers import Trainer, TrainingArguments

from ..demo import RunResult, common_training_fields, format_table, plot_accuracy_against_time, train_one
from ..run import DataArguments, ModelArguments, build_dense_vit, build_sparse_vit, prepare_data
from ..trainers.tri_level import TriLevelTrainer, TriLevelTrainingArguments


@dataclass
class E2EVariant:
    name: str
    example_pruning: str | None  # None: the dense HF ViT with the plain Trainer
    token_keep_ratio: float = 1.0
    attention_keep_ratio: float = 1.0
    inactive_fraction: float = 0.2


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


def run_variant(key: str, args, data, model_args) -> RunResult:
    variant = VARIANTS[key]
    dense_model = build_dense_vit(model_args, data, args.seed)
    common = common_training_fields(
        os.path.join(args.output_dir, key), args.epochs, args.batch_size, args.seed, args.evaluations
    )
    if variant.example_pruning is None:
        return train_one(variant.name, Trainer, dense_model, TrainingArguments(**common), data)[0]
    model = build_sparse_vit(
        model_args, data, args.seed, variant.token_keep_ratio, variant.attention_keep_ratio, from_dense=dense_model
    )
    training_args = TriLevelTrainingArguments(
        **common,
        example_pruning=variant.example_pruning,
        example_inactive_fraction=variant.inactive_fraction if variant.example_pruning != "none" else 0.0,
        token_keep_ratio=variant.token_keep_ratio,
        attention_keep_ratio=variant.attention_keep_ratio,
    )
    return train_one(variant.name, TriLevelTrainer, model, training_args, data)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="outputs/bench_e2e")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--evaluations", type=int, default=2)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=6)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")


def main(args: argparse.Namespace) -> list[dict]:
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if keys[0] != "dense":
        keys = ["dense"] + [k for k in keys if k != "dense"]  # ratios are against the dense run
    os.makedirs(args.output_dir, exist_ok=True)
    data = prepare_data(
        DataArguments(max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples), seed=args.seed
    )
    model_args = ModelArguments(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=4 * args.hidden_size,
        patch_size=args.patch_size,
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
    plot_accuracy_against_time(medians, os.path.join(args.output_dir, "accuracy_vs_wall_clock.png"))
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
        json.dump({"arguments": vars(args), "rows": rows}, handle, indent=2)
    return rows
