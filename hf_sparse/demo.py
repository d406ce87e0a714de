"""`hf-sparse demo`: the main job. Trains a dense ViT and a Tri-Level SparseViT from the same initial weights on
Fashion-MNIST with the same epochs and hyper-parameters, then prints a table (test accuracy, training wall-clock,
images trained, time saved) and writes two plots: test accuracy against wall-clock, and the patches the Tri-Level
model kept on a few test images.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from .run import (
    DataArguments,
    ModelArguments,
    TrainingClockCallback,
    build_dense_vit,
    build_sparse_vit,
    compute_accuracy,
    prepare_data,
)
from .trainers.tri_level import TriLevelTrainer, TriLevelTrainingArguments


@dataclass
class RunResult:
    name: str
    accuracy: float
    train_seconds: float
    images_trained: int
    curve: list[dict[str, float]]


def common_training_fields(output_dir: str, epochs: float, batch_size: int, seed: int, evaluations: int) -> dict:
    return dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=512,
        learning_rate=1e-3,
        weight_decay=0.05,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        eval_steps=1.0 / evaluations,
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # with_transform data: the transform needs the raw image column
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def train_one(name: str, trainer_class, model, training_args, data) -> tuple[RunResult, Trainer]:
    clock = TrainingClockCallback()
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        compute_metrics=compute_accuracy,
        callbacks=[clock],
    )
    print(f"\n=== {name} ===", flush=True)
    train_output = trainer.train()
    train_seconds = clock.train_seconds()
    del train_output
    # The Tri-Level trainer counts what it trained; the dense run trains every example every epoch.
    images = getattr(trainer, "samples_seen", None) or round(training_args.num_train_epochs * len(data.train))
    accuracy = clock.curve[-1]["accuracy"] if clock.curve else trainer.evaluate()["eval_accuracy"]
    return RunResult(name, accuracy, train_seconds, images, clock.curve), trainer


def plot_accuracy_against_time(results: list[RunResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for result in results:
        seconds = [0.0] + [point["train_seconds"] for point in result.curve]
        accuracy = [0.1] + [100 * point["accuracy"] for point in result.curve]
        accuracy[0] = 10.0  # chance level before training
        axis.plot(seconds, accuracy, marker="o", label=result.name)
    axis.set_xlabel("training wall-clock (s, evaluation excluded)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Fashion-MNIST: dense ViT vs Tri-Level SparseViT")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_kept_patches(model, data, path: str, num_images: int = 6) -> None:
    """Show which patches survive the last pruning layer (the rest are greyed out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    batch = data.eval[:num_images]
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"].to(model.device))
    config = model.config
    grid = data.image_size // config.patch_size
    figure, axes = plt.subplots(2, num_images, figsize=(1.8 * num_images, 4.6))
    images = batch["pixel_values"].cpu().numpy()
    kept = outputs.kept_patch_indices[-1].cpu().numpy() if outputs.kept_patch_indices else None
    for column in range(num_images):
        image = images[column].mean(axis=0)
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
        axes[0, column].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[0, column].set_title(data.label_names[int(batch["labels"][column])], fontsize=8)
        dropped = np.ones((grid, grid), dtype=bool)
        if kept is not None:
            dropped.flat[kept[column]] = False
        else:
            dropped[:] = False
        dropped = np.kron(dropped, np.ones((config.patch_size, config.patch_size), dtype=bool))
        overlay = np.repeat(image[:, :, None], 3, axis=2)
        overlay[dropped] = 0.35 * overlay[dropped] + 0.65 * np.array([0.85, 0.1, 0.1])  # dropped: red
        axes[1, column].imshow(overlay)
        kept_count = grid * grid if kept is None else len(kept[column])
        axes[1, column].set_title(f"kept {kept_count}/{grid * grid}", fontsize=8)
        for row in range(2):
            axes[row, column].axis("off")
    figure.suptitle("Patches kept after the last pruning layer (dropped in red)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_table(results: list[RunResult]) -> str:
    dense = results[0]
    lines = [f"{'run':<22} {'test acc %':>10} {'train s':>9} {'images':>9} {'time saved':>11} {'acc delta':>10}"]
    for result in results:
        saved = 1.0 - result.train_seconds / dense.train_seconds
        delta = 100 * (result.accuracy - dense.accuracy)
        lines.append(
            f"{result.name:<22} {100 * result.accuracy:>10.2f} {result.train_seconds:>9.1f} {result.images_trained:>9d} "
            f"{100 * saved:>10.1f}% {delta:>+10.2f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[RunResult]:
    os.makedirs(args.output_dir, exist_ok=True)
    data = prepare_data(
        DataArguments(dataset_name=args.dataset_name, max_train_samples=args.max_train_samples,
                      max_eval_samples=args.max_eval_samples),
        seed=args.seed,
    )
    model_args = ModelArguments(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=4 * args.hidden_size,
        patch_size=args.patch_size,
    )
    dense_model = build_dense_vit(model_args, data, args.seed)
    # Same initial weights for both runs: SparseViT is converted from the untrained dense model.
    sparse_model = build_sparse_vit(
        model_args, data, args.seed, args.token_keep_ratio, args.attention_keep_ratio, from_dense=dense_model
    )
    common = common_training_fields(args.output_dir, args.epochs, args.batch_size, args.seed, args.evaluations)

    dense_args = TrainingArguments(**{**common, "output_dir": os.path.join(args.output_dir, "dense")})
    dense, _ = train_one("dense ViT", Trainer, dense_model, dense_args, data)

    tri_args = TriLevelTrainingArguments(
        **{**common, "output_dir": os.path.join(args.output_dir, "tri_level")},
        example_pruning=args.example_pruning,
        example_inactive_fraction=args.example_inactive_fraction,
        token_keep_ratio=args.token_keep_ratio,
        attention_keep_ratio=args.attention_keep_ratio,
    )
    tri, tri_trainer = train_one("Tri-Level SparseViT", TriLevelTrainer, sparse_model, tri_args, data)
    results = [dense, tri]

    table = format_table(results)
    print("\n" + table)
    plot_accuracy_against_time(results, os.path.join(args.output_dir, "accuracy_vs_wall_clock.png"))
    plot_kept_patches(tri_trainer.model, data, os.path.join(args.output_dir, "kept_patches.png"))
    tri_trainer.save_model(os.path.join(args.output_dir, "tri_level", "final"))
    data.image_processor().save_pretrained(os.path.join(args.output_dir, "tri_level", "final"))
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"runs": [r.__dict__ for r in results], "arguments": vars(args)}, handle, indent=2)
    print(f"\nWrote {args.output_dir}/results.json, accuracy_vs_wall_clock.png, kept_patches.png and the Tri-Level "
          f"model in {args.output_dir}/tri_level/final")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--dataset_name", default="fashion_mnist")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--evaluations", type=int, default=4, help="test-set evaluations per run (for the curve)")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=6)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--example_pruning", default="forgetting")
    parser.add_argument("--example_inactive_fraction", type=float, default=0.2)
    parser.add_argument("--token_keep_ratio", type=float, default=0.7)
    parser.add_argument("--attention_keep_ratio", type=float, default=1.0)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
