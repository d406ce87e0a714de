"""One training run of an experiment, timed without evaluation, and the table that compares runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer

from .common import TrainingClockCallback, compute_accuracy


@dataclass
class RunResult:
    name: str
    accuracy: float
    train_seconds: float
    images_trained: int
    curve: list[dict[str, float]] = field(default_factory=list)


def train_one(name: str, trainer_class, model, training_args, data) -> tuple[RunResult, Trainer]:
    """Train `model` with `trainer_class`; returns the run's result and the trainer."""
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
    # The Tri-Level trainer counts what it trained; the dense run trains every example every epoch.
    images = getattr(trainer, "samples_seen", None) or round(training_args.num_train_epochs * len(data.train))
    return RunResult(name, clock.curve[-1]["accuracy"], train_seconds, images, clock.curve), trainer


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
