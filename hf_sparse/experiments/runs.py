"""Runs of an accuracy-against-time experiment, and the protocol that makes them comparable.

Every Tri-Level run is set beside two dense runs from the same initial weights (see `../shared/experiments.md`):
  * dense: transformers' ViT for the same epochs;
  * budget-matched dense: a dense run as long as the Tri-Level run took (its step count from the dense run's
    measured seconds per step), with its own cosine schedule fully decayed at its end, not a point read off the
    middle of the long run;
and time to accuracy: the training wall-clock (evaluation excluded) at which a run's evaluations first reach the
full dense run's final accuracy less `TOLERANCE`, read off the run's own curve (None when never reached).

A run that drops tokens (token pruning, random token selection, PatchDropout) is evaluated, once trained, both pruned
(CLS-attention selection at the variant's token keep ratio, at the model's pruning layers) and with all tokens.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import Trainer, TrainingArguments

from ..flops import matched_patch_dropout_keep_ratio
from ..models.sparse_vit import SparseViTForImageClassification
from ..tri_level import TriLevelTrainer, TriLevelTrainingArguments
from .common import TrainingClockCallback, build_dense_vit, build_sparse_vit, compute_accuracy

TOLERANCE = 0.003  # "reaches dense accuracy": within 0.3 points


@dataclass
class RunResult:
    name: str
    accuracy: float
    train_seconds: float
    images_trained: int
    curve: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    role: str = "dense"  # dense | dense_budget_matched | tri_level | patch_dropout (the demo's alternative)
    final_learning_rate: float | None = None  # 0 when the schedule decayed fully
    # Runs that drop tokens: the final model evaluated pruned (CLS attention at the variant's token keep ratio) and
    # with all tokens (None for other runs, and in results written before these were measured).
    pruned_accuracy: float | None = None
    all_tokens_accuracy: float | None = None
    patch_dropout_keep_ratio: float | None = None  # PatchDropout runs: the (FLOPs-matched) share of patches kept


@dataclass(frozen=True)
class Variant:
    """A Tri-Level setting: the three levels' final ratios (`example_pruning` None: dense ViT), how tokens are
    selected (`SparseViTConfig.token_selection`), PatchDropout with the training FLOPs of a token-pruning run to
    `patch_dropout_matched_to` (the model's pruning layers, the keep-ratio schedule included;
    `flops.matched_patch_dropout_keep_ratio`), and a length set by another variant's steps (`steps_matched_to`)."""

    label: str
    example_pruning: str | None
    token_keep_ratio: float = 1.0
    attention_keep_ratio: float = 1.0
    inactive_fraction: float | None = None
    token_fusion: bool = False
    token_selection: str = "cls_attention"
    patch_dropout_matched_to: float | None = None
    # train exactly the optimizer steps of this other variant's run of the same seed (its own schedule decays over
    # them): e.g. tokens alone given what the data level leaves, to see whether the levels compound
    steps_matched_to: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)  # more TriLevelTrainingArguments

    @property
    def pruned_token_keep_ratio(self) -> float:
        """The token keep ratio of the "pruned" evaluation: the model's own, or the one PatchDropout is matched to
        (1.0: the variant drops no tokens)."""
        return self.patch_dropout_matched_to or self.token_keep_ratio


def train_one(name: str, trainer_class, model, training_args, data, role: str = "dense") -> tuple[RunResult, Trainer]:
    """Train `model` with `trainer_class`; the final model is evaluated once if the run did not end on an evaluation."""
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
    trainer.train()
    train_seconds = clock.train_seconds()
    if not clock.curve or clock.curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the final model, once (the clock adds it to the curve)
    steps = trainer.state.global_step
    # The Tri-Level trainer counts what it trained; a dense run trains every example of each epoch it ran.
    images = getattr(trainer, "samples_seen", None) or round(trainer.state.epoch * len(data.train))
    final_lr = trainer.lr_scheduler.get_last_lr()[0] if trainer.lr_scheduler is not None else None
    result = RunResult(name, clock.curve[-1]["accuracy"], train_seconds, images, clock.curve, steps, role, final_lr)
    return result, trainer


def slug(name: str) -> str:
    """A folder name for a run."""
    return "".join(character if character.isalnum() else "_" for character in name.lower()).strip("_")


def train_dense(data, model_args, seed: int, fields: dict[str, Any], name: str = "dense ViT",
                max_steps: int | None = None, role: str = "dense") -> tuple[RunResult, Trainer]:
    """transformers' ViT from `seed`'s initial weights, for the epochs in `fields` or exactly `max_steps` (its
    schedule then fully decays at that step)."""
    model = build_dense_vit(model_args, data, seed)
    fields = dict(fields, output_dir=os.path.join(fields["output_dir"], slug(name)))
    if max_steps is not None:
        fields["max_steps"] = max_steps
    return train_one(name, Trainer, model, TrainingArguments(**fields), data, role)


def tri_level_run(data, model_args, seed: int, fields: dict[str, Any], variant: Variant,
                  name: str | None = None) -> tuple[str, SparseViTForImageClassification, TriLevelTrainingArguments]:
    """(name, model, arguments) of a Tri-Level run: a SparseViT converted from the dense run's initial weights and its
    `TriLevelTrainingArguments`. Building them checks every value, so a caller can do it before anything trains."""
    name = name or variant.label
    fields = dict(fields, output_dir=os.path.join(fields["output_dir"], slug(name)))
    args = TriLevelTrainingArguments(
        **fields, example_pruning=variant.example_pruning, example_inactive_fraction=variant.inactive_fraction,
        **variant.arguments,
    )
    dense = build_dense_vit(model_args, data, seed)
    model_args = replace(model_args, token_fusion=variant.token_fusion or model_args.token_fusion)
    model = build_sparse_vit(model_args, data, seed, variant.token_keep_ratio, variant.attention_keep_ratio,
                             from_dense=dense, token_selection=variant.token_selection)
    if variant.patch_dropout_matched_to is not None:
        # matched on the model's own geometry and pruning layers, to the whole token-pruning run: its dense warm-up
        # and cosine decay included (the schedule of these arguments)
        keep_ratio = matched_patch_dropout_keep_ratio(model.config, variant.patch_dropout_matched_to,
                                                      args.keep_ratio_schedule)
        model = build_sparse_vit(model_args, data, seed, variant.token_keep_ratio, variant.attention_keep_ratio,
                                 from_dense=dense, token_selection=variant.token_selection,
                                 patch_dropout_keep_ratio=keep_ratio)
    return name, model, args


def train_tri_level(data, model_args, seed: int, fields: dict[str, Any], variant: Variant,
                    name: str | None = None) -> tuple[RunResult, TriLevelTrainer]:
    """A SparseViT converted from the dense run's initial weights, trained by `TriLevelTrainer` with `variant`; a
    variant that drops tokens is also evaluated pruned and with all tokens (`token_level_accuracies`)."""
    name, model, args = tri_level_run(data, model_args, seed, fields, variant, name)
    result, trainer = train_one(name, TriLevelTrainer, model, args, data, role="tri_level")
    result.pruned_accuracy, result.all_tokens_accuracy = token_level_accuracies(trainer, variant, result.accuracy)
    if model.config.patch_dropout_keep_ratio < 1.0:
        result.patch_dropout_keep_ratio = model.config.patch_dropout_keep_ratio
    return result, trainer


def token_level_accuracies(trainer: TriLevelTrainer, variant: Variant,
                           accuracy: float) -> tuple[float | None, float | None]:
    """(pruned, all tokens) test accuracies of a trained run that drops tokens ((None, None) otherwise): CLS-attention
    selection at `variant.pruned_token_keep_ratio`, and token keep ratio 1.0 (attention sparsity as trained).
    `accuracy`, the run's final evaluation at the model's own ratio, stands for whichever of the two that is."""
    pruned_ratio = variant.pruned_token_keep_ratio
    if pruned_ratio >= 1.0:
        return None, None
    own_ratio = trainer.unwrapped_model.config.token_keep_ratio

    def at(ratio: float) -> float:
        if ratio == own_ratio:
            return accuracy
        with own_token_keep_ratio(trainer.unwrapped_model, ratio):
            # not the "eval" prefix: the run's clock puts only `eval_accuracy` on its curve
            return trainer.evaluate(metric_key_prefix="token_level")["token_level_accuracy"]

    return at(pruned_ratio), at(1.0)


@contextmanager
def own_token_keep_ratio(model: SparseViTForImageClassification, ratio: float) -> Iterator[None]:
    """Makes `ratio` the model's own token keep ratio for a while: `TriLevelTrainer.evaluate` evaluates at the
    model's own ratios (`reset_sparsity`), whatever `set_sparsity` set before."""
    config = model.config
    held = config.token_keep_ratio
    config.token_keep_ratio = ratio
    try:
        yield
    finally:
        config.token_keep_ratio = held
        model.reset_sparsity()


def budget_matched_steps(dense: RunResult, seconds: float) -> int:
    """Optimizer steps a dense run takes in `seconds`, from the full dense run's measured seconds per step."""
    return max(1, round(dense.steps * seconds / dense.train_seconds))


def time_to_accuracy(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first evaluation at or above `target` (None when never reached)."""
    return next((point["train_seconds"] for point in curve if point["accuracy"] >= target), None)


def median(values: list[float | None]) -> float | None:
    """The median, counting None as "never" (+infinity): None when half the values or more are None."""
    ranked = sorted(float("inf") if value is None else value for value in values)
    if not ranked:
        return None
    value = statistics.median(ranked)
    return None if value == float("inf") else value


def spread(values: list[float | None]) -> list[float | None]:
    """[min, max] of the values that are not None."""
    known = [value for value in values if value is not None]
    return [min(known), max(known)] if known else [None, None]
