"""`ToSTTrainingArguments`: `TrainingArguments` plus ToST's mask and its four techniques."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from transformers import TrainingArguments

from ..validation import check_bool, check_choice, check_fraction, check_int, check_positive
from .ghosts import GHOST_SKIP_SCHEDULES
from .masks import DEFAULT_PRUNABLE_PATTERNS, MASK_METHODS, MASK_SCOPES, MaskConfig


TOST_MASK_METHODS: tuple[str, ...] = (*MASK_METHODS, "lottery_ticket")
RESCALED_INIT_METHODS: tuple[str, ...] = ("gradinit", "density", "none")
GRADINIT_STEPS = 180
"""GradInit's iterations in the ToST README's command, whatever the run's length (their code's default is 390)."""
GRADINIT_MAX_STEPS = GRADINIT_STEPS  # the name earlier versions exported


# The recipe each model family gets when its fields are left unset (None): the best settings measured in
# `hf-sparse bench tost` (see the README). "vit": SparseViT, HF ViT; "cnn": every other model (transformers' ResNet).
FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    # ViT: 1/sqrt(density) rescaling, soft GELU ghosts and label smoothing won; ghost skips and GradInit lost.
    "vit": dict(ghost_soft_neurons=True, ghost_skip_connections=False, ghost_end_fraction=0.1, ghost_skip_alpha=1.0,
                rescaled_init="density", label_smoothing=0.1),
    # CNN (batch-normalised ResNet): vanilla sparse training. In the cifar_like regime over 3 seeds, six masks,
    # nothing ToST offers beat it by more than seed noise: label smoothing 0.1 won 3 of 12 pairs at 95/98 % (-0.45
    # points), the authors' ghost skips with the Swish ghosts 7 of 12 (-0.04) at +13 % time, at 98 % the Swish ghosts
    # alone 4 of 6 (+0.10), GradInit 3 of 6 (-0.19) and the paper's full recipe 1 of 6 (-0.66), both at more than
    # twice a run's time; 1/sqrt(density) is undone by BatchNorm (README). The ghost settings serve runs that switch
    # the ghosts on.
    "cnn": dict(ghost_soft_neurons=False, ghost_skip_connections=False, ghost_end_fraction=0.3, ghost_skip_alpha=1.0,
                rescaled_init="none", label_smoothing=0.0),
}


# How each recipe field is checked (shared with `hf-sparse bench tost`, whose variants may set some of them).
RECIPE_FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "ghost_soft_neurons": partial(check_bool, "ghost_soft_neurons"),
    "ghost_skip_connections": partial(check_bool, "ghost_skip_connections"),
    "ghost_end_fraction": partial(check_fraction, "ghost_end_fraction", low_inclusive=False, high_inclusive=True),
    "ghost_skip_alpha": partial(check_positive, "ghost_skip_alpha"),
    "rescaled_init": partial(check_choice, "rescaled_init", allowed=RESCALED_INIT_METHODS),
    "label_smoothing": partial(check_fraction, "label_smoothing"),
}


def default_rescaled_init_steps(total_steps: int) -> int:
    """GradInit's iterations when `rescaled_init_steps` is unset: the ToST README's 180, independent of the run's
    `total_steps` (a fraction of a short run, e.g. 12 steps, leaves the scales within +/-12 % of 1: GradInit inert).
    Its time is part of the run's (`sparsity_setup["rescaled_init_seconds"]`, inside `train()`)."""
    check_int("total_steps", total_steps, minimum=0)
    return GRADINIT_STEPS


@dataclass
class ToSTTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus ToST's mask and its four techniques. Technique fields left unset (None) take the
    best recipe measured for the model's family (`FAMILY_RECIPES`, filled in by the trainer on a copy of the arguments);
    every technique switches off on its own (`ghost_soft_neurons=False`, `ghost_skip_connections=False`,
    `rescaled_init="none"`, `label_smoothing=0`), so "vanilla" sparse training is all four off.

    `ddp_find_unused_parameters` defaults to False here (the Trainer's default searches for unused parameters every
    step under DDP); set it to True for a model with parameters that get no gradient."""

    # --- the mask -------------------------------------------------------------------------------------------------
    mask_method: str = field(
        default="snip",
        metadata={
            "help": f"How the weight mask is found: one of {TOST_MASK_METHODS}. Ignored if the model already carries "
            "masks or `mask_path` is given.",
            "choices": TOST_MASK_METHODS,
        },
    )
    sparsity: float = field(
        default=0.9,
        metadata={
            "help": "Fraction of the prunable weights set to zero (ViT: the q/k/v/o projections, fc1 and fc2; CNN: "
            "every convolution after the stem)."
        },
    )
    mask_scope: str = field(
        default="layer",
        metadata={
            "help": "'layer': the same sparsity in every prunable layer (default: on a ViT, one global threshold of "
            "SNIP/GraSP/SynFlow can prune a whole q_proj/k_proj at high sparsity); 'global': one threshold over all "
            "prunable weights, as in the CNN papers. 'random' is always per layer.",
            "choices": MASK_SCOPES,
        },
    )
    mask_batches: int = field(
        default=1, metadata={"help": "Training batches whose gradients SNIP and GraSP sum (per-device batch size)."}
    )
    mask_seed: int | None = field(
        default=None, metadata={"help": "Seed of the random mask and of the data used to score masks (default: seed)."}
    )
    mask_path: str | None = field(
        default=None,
        metadata={"help": "A `sparsity_masks.safetensors` file (or a folder holding one) to use instead of computing."},
    )
    mask_patterns: str | None = field(
        default=None,
        metadata={
            "help": "Regex on module names selecting the prunable nn.Linear / convolution modules (default: the ViT "
            "projections or, on a CNN, every convolution but the stem and every Linear but the classifier)."
        },
    )
    synflow_rounds: int = field(default=100, metadata={"help": "SynFlow's score-and-prune rounds (paper: 100)."})
    lottery_ticket_rounds: int | None = field(
        default=None,
        metadata={
            "help": "IMP rounds. Default: the fewest k with 1 - 0.8^k >= sparsity (11 for 0.9); each round then prunes "
            "1 - (1 - sparsity)^(1/k) (<= 20 %) of the survivors, so the last round lands exactly on `sparsity`."
        },
    )
    lottery_ticket_round_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Optimizer steps of each dense IMP round as a fraction of this training's steps. 1.0 is classic "
            "IMP (every round a full training); the default 0.1 costs rounds x 10 % extra (1.1x at 90 % sparsity)."
        },
    )
    lottery_ticket_rewind_step: int = field(
        default=0,
        metadata={
            "help": "0: rewind to the initial weights (Frankle & Carbin 2019). k > 0: rewind to the weights after k "
            "optimizer steps of the first IMP round (Frankle et al. 2020); k must not exceed a round's steps."
        },
    )

    # --- ghosts ---------------------------------------------------------------------------------------------------
    ghost_soft_neurons: bool | None = field(
        default=None,
        metadata={"help": "Start with softer activations (GELU: x*Phi(lambda x), ReLU: Swish) annealed back "
                  "(default: the model family's recipe)."},
    )
    ghost_skip_connections: bool | None = field(
        default=None, metadata={"help": "Add alpha*G(x) around each sparse layer, alpha annealed to 0: on a ViT G is "
                                "identity-like and parameter-free; on a CNN G is the ToST code's trainable 1x1 "
                                "convolution + BatchNorm around each k x k convolution, joined after its BatchNorm and "
                                "deleted with its optimizer state (default: the model family's recipe)."}
    )
    ghost_end_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the optimizer steps after which the ghosts are gone (annealed linearly from the "
            "start; default: the model family's recipe)."
        },
    )
    ghost_activation_lambda: float = field(
        default=0.5, metadata={"help": "Soft neurons: starting sharpness lambda_0 of x*Phi(lambda x) (1 = GELU)."}
    )
    ghost_skip_alpha: float | None = field(
        default=None, metadata={"help": "Ghost skips: starting scale alpha_0 of G(x) (default: the family's)."}
    )
    ghost_skip_schedule: str = field(
        default="linear",
        metadata={"help": f"Ghost skips: alpha from alpha_0 to 0, one of {GHOST_SKIP_SCHEDULES}.",
                  "choices": GHOST_SKIP_SCHEDULES},
    )

    # --- layer-wise rescaled initialisation -----------------------------------------------------------------------
    rescaled_init: str | None = field(
        default=None,
        metadata={
            "help": f"One of {RESCALED_INIT_METHODS}: GradInit scales learned with a masked look-ahead, the closed "
            "form 1/sqrt(density) per layer, or nothing (default: the model family's recipe).",
            "choices": RESCALED_INIT_METHODS,
        },
    )
    rescaled_init_steps: int | None = field(
        default=None,
        metadata={"help": f"GradInit iterations (default {GRADINIT_STEPS}, the ToST README's, whatever the run's "
                  "length; its time counts in the run's)."},
    )
    gradinit_lr: float = field(default=1e-2, metadata={"help": "GradInit: Adam learning rate of the scales."})
    gradinit_eta: float = field(default=0.1, metadata={"help": "GradInit: look-ahead step size (normalised gradient)."})
    gradinit_gamma: float = field(
        default=1.0, metadata={"help": "GradInit: above this gradient norm, lower the norm instead of the loss."}
    )
    gradinit_min_scale: float = field(default=0.01, metadata={"help": "GradInit: lower bound of every scale."})

    # --- label smoothing ------------------------------------------------------------------------------------------
    label_smoothing: float | None = field(
        default=None,
        metadata={
            "help": "ToST's alpha: 1 - alpha on the label, alpha/(C-1) on each other class (PyTorch/HF epsilon = "
            "alpha*C/(C-1)). 0 turns it off (default: the model family's recipe). Do not combine with "
            "`label_smoothing_factor`."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ddp_find_unused_parameters is None:
            # Every parameter of the model gets a gradient at every step (soft neurons and the ViT's ghost skips hold
            # no parameters; a CNN's ghost branches live outside the model, their gradients averaged by the ghost
            # callback), so DDP need not search the autograd graph for unused ones (the Trainer's default unless
            # gradient checkpointing is on). An explicit True is kept.
            self.ddp_find_unused_parameters = False
        check_choice("mask_method", self.mask_method, TOST_MASK_METHODS)
        check_fraction("sparsity", self.sparsity)
        check_choice("mask_scope", self.mask_scope, MASK_SCOPES)
        check_int("mask_batches", self.mask_batches, minimum=1)
        if self.mask_seed is not None:
            check_int("mask_seed", self.mask_seed, minimum=0)
        if self.mask_path is not None and not (isinstance(self.mask_path, (str, os.PathLike)) and str(self.mask_path)):
            raise ValueError(f"`mask_path` must be a path, got {self.mask_path!r}.")
        if self.mask_patterns is not None:
            try:
                MaskConfig(patterns=self.mask_patterns)
            except ValueError as error:
                raise ValueError(f"`mask_patterns`: {error}") from error
        check_int("synflow_rounds", self.synflow_rounds, minimum=1)
        if self.lottery_ticket_rounds is not None:
            check_int("lottery_ticket_rounds", self.lottery_ticket_rounds, minimum=1)
        check_fraction("lottery_ticket_round_fraction", self.lottery_ticket_round_fraction,
                       low_inclusive=False, high_inclusive=True)
        check_int("lottery_ticket_rewind_step", self.lottery_ticket_rewind_step, minimum=0)
        self._check_recipe()
        check_positive("ghost_activation_lambda", self.ghost_activation_lambda)
        check_choice("ghost_skip_schedule", self.ghost_skip_schedule, GHOST_SKIP_SCHEDULES)
        if self.rescaled_init_steps is not None:
            check_int("rescaled_init_steps", self.rescaled_init_steps, minimum=0)
        for name in ("gradinit_lr", "gradinit_eta", "gradinit_gamma", "gradinit_min_scale"):
            check_positive(name, getattr(self, name))
        if (self.label_smoothing or 0) > 0 and self.label_smoothing_factor > 0:
            raise ValueError(
                f"`label_smoothing` ({self.label_smoothing}, ToST's alpha/(C-1) convention) and "
                f"`label_smoothing_factor` ({self.label_smoothing_factor}, HF's eps/C) are both set: use one. "
                "For the paper's 0.1 keep `label_smoothing=0.1` and `label_smoothing_factor=0`."
            )

    def _check_recipe(self) -> None:
        """Check the recipe fields that are set (None: the family's, checked once filled in)."""
        for name, check in RECIPE_FIELD_CHECKS.items():
            if getattr(self, name) is not None:
                check(getattr(self, name))

    def apply_family_recipe(self, family: str, single_label: bool = True) -> None:
        """Fill the recipe fields left unset with `FAMILY_RECIPES[family]` (the trainer calls it, on a copy, with
        its model's family; fields already set are kept). Label smoothing is left off for models that are not
        single-label classifiers, and when HF's own `label_smoothing_factor` is set (never both)."""
        check_choice("family", family, tuple(FAMILY_RECIPES))
        if self.label_smoothing is None and (self.label_smoothing_factor > 0 or not single_label):
            self.label_smoothing = 0.0
        for name, value in FAMILY_RECIPES[family].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._check_recipe()

    @property
    def mask_data_seed(self) -> int:
        """The seed of the random mask and of the batches that score masks (`mask_seed`, else `seed`)."""
        return self.mask_seed if self.mask_seed is not None else self.seed

    @property
    def mask_patterns_tuple(self) -> tuple[str, ...]:
        return DEFAULT_PRUNABLE_PATTERNS if self.mask_patterns is None else (self.mask_patterns,)

    @property
    def uses_ghosts(self) -> bool:
        return bool(self.ghost_soft_neurons or self.ghost_skip_connections)
