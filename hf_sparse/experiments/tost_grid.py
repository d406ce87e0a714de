"""What a cell of `hf-sparse bench tost`'s grid trains: the model families (`FAMILIES`), how each family's images are
fed (`REGIMES`, with each regime's default grid in `REGIME_GRIDS`), and the technique variants (`TECHNIQUES`, single
techniques joined by "+", "field=value" settings) with the `ToSTTrainingArguments` each one sets.

`bench_tost.py` runs the grid; this module only describes it, so the variants can be checked and planned without
training anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ..tost.arguments import FAMILY_RECIPES, RECIPE_FIELD_CHECKS
from ..validation import check_positive
from .common import ModelArguments, with_defaults_from


@dataclass(frozen=True)
class Family:
    """How a model family is trained in this benchmark."""

    model_type: str
    epochs: float
    max_train_samples: int | None
    learning_rate: float
    training: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # ModelArguments fields, where the command line left defaults


FAMILIES: dict[str, Family] = {
    # The paper's CNN recipe (SGD, momentum 0.9, lr 0.1), cosine instead of its step decay, weight decay 5e-4.
    "resnet": Family("resnet", epochs=15, max_train_samples=5_000, learning_rate=0.1,
                     training=dict(optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4, warmup_steps=0)),
    # The demo's ViT recipe (AdamW, weight decay 0.05, 5 % warm-up) on a smaller ViT (hidden 64 x 4 layers).
    "sparse_vit": Family("sparse_vit", epochs=8, max_train_samples=10_000, learning_rate=1e-3,
                         model=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4)),
}


def recipe_family(family: Family) -> str:
    """The `FAMILY_RECIPES` key that `ToSTTrainer` picks for the family's models."""
    return "vit" if family.model_type == "sparse_vit" else "cnn"


def family_model(family: Family, model_args: ModelArguments) -> ModelArguments:
    """The family's model type and sizes, where the command line left `ModelArguments`' defaults."""
    return replace(with_defaults_from(model_args, family.model), model_type=family.model_type)


VANILLA = dict(ghost_soft_neurons=False, ghost_skip_connections=False, rescaled_init="none", label_smoothing=0.0)
TECHNIQUES: dict[str, dict[str, Any]] = {
    "vanilla": VANILLA,
    "full": {},  # ToSTTrainingArguments' defaults for the model's family: the best recipe measured
    # each technique alone, with the family recipe's settings where it has them (else the paper's)
    "ghost_neurons": {**VANILLA, "ghost_soft_neurons": True},
    "ghost_skips": {**VANILLA, "ghost_skip_connections": True},
    "rescaled_init": {**VANILLA, "rescaled_init": "family"},
    "label_smoothing": {**VANILLA, "label_smoothing": "family"},
    "gradinit": {**VANILLA, "rescaled_init": "gradinit"},
    "density_init": {**VANILLA, "rescaled_init": "density"},
}
PAPER_VALUES = {"rescaled_init": "gradinit", "label_smoothing": 0.1}
# the paper's recipe as published: all four techniques, GradInit and label smoothing 0.1
TECHNIQUES["paper"] = {"ghost_soft_neurons": True, "ghost_skip_connections": True, **PAPER_VALUES}
COMBINABLE = ("ghost_neurons", "ghost_skips", "rescaled_init", "label_smoothing", "gradinit", "density_init")
# `ToSTTrainingArguments` fields a variant may set as "field=value" (for tuning a family's recipe)
SETTABLE: dict[str, Any] = {
    **{name: RECIPE_FIELD_CHECKS[name] for name in ("label_smoothing", "ghost_end_fraction", "ghost_skip_alpha")},
    "ghost_activation_lambda": partial(check_positive, "ghost_activation_lambda"),
}


def _parse_variant(technique: str) -> tuple[list[str], dict[str, float]]:
    """The single techniques and the "field=value" settings of a variant joined by "+"."""
    names, values = [], {}
    for part in technique.split("+"):
        name, equals, value = part.partition("=")
        if not equals:
            names.append(name)
            continue
        if name not in SETTABLE:
            raise ValueError(f"`techniques`: {part!r} in {technique!r} sets {name!r}; settable: {list(SETTABLE)}.")
        try:
            values[name] = SETTABLE[name](float(value))
        except ValueError as error:
            raise ValueError(f"`techniques`: {part!r} in {technique!r}: {error}") from None
    return names, values


def check_technique(technique: str) -> None:
    """A variant is a name of `TECHNIQUES`, or single techniques and "field=value" settings joined by "+"
    ("ghost_skips+label_smoothing", "label_smoothing=0.2", "ghost_neurons+ghost_end_fraction=0.5")."""
    if technique in TECHNIQUES:
        return
    names, values = _parse_variant(technique)
    fields = [part.partition("=")[0] for part in technique.split("+")]
    unknown = [name for name in names if name not in COMBINABLE]
    if unknown or (len(names) < 2 and not values) or len(set(fields)) != len(fields):
        raise ValueError(f"`techniques`: {technique!r} is neither one of {list(TECHNIQUES)} nor distinct single "
                         f"techniques (from {list(COMBINABLE)}) and field=value settings (from {list(SETTABLE)}) "
                         "joined by '+'.")
    scales = [part for part in names if part in ("rescaled_init", "gradinit", "density_init")]
    if len(scales) > 1:
        raise ValueError(f"`techniques`: {technique!r} combines {scales}; a run has one rescaled initialisation.")


def technique_arguments(technique: str, family: Family) -> dict[str, Any]:
    """The `ToSTTrainingArguments` of a variant: "family" means the family recipe's value, or the paper's when the
    recipe leaves that technique off; "a+b" is vanilla with each part's technique switched on, and "field=value"
    sets that field (label_smoothing=0.2 switches smoothing on at 0.2)."""
    check_technique(technique)
    recipe = FAMILY_RECIPES[recipe_family(family)]
    if technique in TECHNIQUES:
        values = dict(TECHNIQUES[technique])
    else:
        names, settings = _parse_variant(technique)
        values = dict(VANILLA)
        for part in names:
            values.update({name: value for name, value in TECHNIQUES[part].items() if value != VANILLA[name]})
        values.update(settings)
    for name, value in values.items():
        if value == "family":
            values[name] = recipe[name] if recipe[name] not in ("none", 0.0) else PAPER_VALUES[name]
    return values


SINGLE_TECHNIQUES = ("ghost_neurons", "ghost_skips", "rescaled_init", "label_smoothing")


@dataclass(frozen=True)
class Regime:
    """How a family's images are fed in a regime: resized, augmented in training, and for how many epochs."""

    image_size: int | None = None
    random_crop_padding: int = 0
    horizontal_flip: bool = False
    epochs: float | None = None


# regime -> family -> its settings (a family not named keeps the default regime's); and the grid's defaults
REGIMES: dict[str, dict[str, Regime]] = {
    "default": {},
    "cifar_like": {"resnet": Regime(image_size=56, random_crop_padding=7, horizontal_flip=True, epochs=30)},
}
REGIME_GRIDS: dict[str, dict[str, Any]] = {
    "default": dict(sparsities=[0.9, 0.95], techniques=["full", *SINGLE_TECHNIQUES], seeds=[42, 43, 44],
                    technique_seeds=1),
    # the authors' ghost skips with the Swish ghosts (the screen's best pair) against vanilla over 3 seeds: 72 runs
    # of ~2.5 min at one thread, plus the lottery ticket's rounds (README: ToST on transformers' ResNet)
    "cifar_like": dict(sparsities=[0.95, 0.98], techniques=["ghost_skips+ghost_neurons"], seeds=[42, 43, 44],
                       technique_seeds=3),
}
