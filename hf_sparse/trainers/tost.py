"""ToST ("Training Your Sparse Neural Network Better with Any Mask", Jaiswal et al., ICML 2022) for Vision
Transformers, as a `TrainingArguments` dataclass paired with a `Trainer` subclass.

Order of events, at the start of `train()` (see `ToSTTrainer.setup_sparsity`):

1. weight mask: computed (random, magnitude, SNIP, GraSP, SynFlow, or a lottery ticket by iterative magnitude
   pruning with rewinding), or loaded from `mask_path`, or taken from the model if it already carries masks;
2. the masks (and then the weights) are made identical on every rank: each rank computes them with the same seed
   and data order, then rank 0's are broadcast and the ranks that differed are counted (`masks_identical_across_ranks`);
3. layer-wise rescaled initialisation: GradInit with a masked look-ahead (`gradinit`), or 1/sqrt(density) (`density`);
4. ghost soft neurons and ghost skip connections, attached when training begins and annealed off by
   `ghost_end_fraction` of the optimizer steps, then removed: the original activation modules come back and the
   skip hooks are deleted, so the final architecture, `state_dict` keys and parameter count are the model's own;
5. training with label smoothing in the paper's convention and masked gradients (a gradient hook per masked weight,
   plus `reapply` after every optimizer step, so pruned weights stay exactly zero).

Resuming from a checkpoint reloads the masks saved beside its weights (`sparsity_masks.safetensors`) and redoes
neither the mask nor the rescaled initialisation (the checkpoint's weights already include them); ghost progress is a
function of the global step, so a resumed run continues the schedule exactly.

What differs from the public ToST code, on purpose: the ghosts really are annealed and removed; the GradInit
look-ahead is masked and always runs after masking; ghost skips are parameter-free identity-like maps (nothing to fold
back); label smoothing is the paper's alpha / (C - 1) on each wrong class; nothing is computed before masking.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.optimization import get_scheduler

from ..hub import TrainingReport, write_save_extras
from ..sparsity import (
    DEFAULT_PRUNABLE_PATTERNS,
    MASK_METHODS,
    MASKS_FILENAME,
    GhostSchedule,
    MaskConfig,
    apply_masks,
    attach_ghost_activations,
    attach_ghost_skips,
    density_rescale,
    find_prunable_linears,
    get_masks,
    gradinit_rescale,
    iterative_magnitude_pruning,
    load_masks,
    prune_model,
    reapply,
    rounds_for_sparsity,
    save_masks,
    sparsity_report,
)
from ..sparsity.ghosts import GHOST_SKIP_SCHEDULES
from ..sparsity.masks import MASK_SCOPES, mask_sparsity, masked_modules
from ..sparsity.utils import check_choice, check_fraction, check_positive, default_loss_fn


from .checkpoints import resolve_resume_checkpoint

logger = logging.getLogger(__name__)

TOST_MASK_METHODS: tuple[str, ...] = (*MASK_METHODS, "lottery_ticket")
RESCALED_INIT_METHODS: tuple[str, ...] = ("gradinit", "density", "none")
GRADINIT_MAX_STEPS = 180
"""The ToST README's GradInit iterations (long CNN runs); short runs use 2 % of their optimizer steps, at least 1."""
GRADINIT_STEP_FRACTION = 0.02


def default_rescaled_init_steps(total_steps: int) -> int:
    """min(180, max(1, round(2 % of the optimizer steps))): 180 on long runs, a few on short ones."""
    return min(GRADINIT_MAX_STEPS, max(1, round(GRADINIT_STEP_FRACTION * total_steps)))


def label_smoothing_epsilon(alpha: float, num_classes: int) -> float:
    """The PyTorch/HF `label_smoothing` epsilon equal to ToST's alpha: eps / C on every class equals alpha / (C - 1)
    on every wrong class and 1 - alpha on the right one when eps = alpha * C / (C - 1)."""
    if num_classes < 2:
        raise ValueError(f"`label_smoothing` needs at least 2 classes, got {num_classes}.")
    epsilon = alpha * num_classes / (num_classes - 1)
    if epsilon > 1.0:
        raise ValueError(
            f"`label_smoothing` = {alpha} is too large for {num_classes} classes: it must be <= "
            f"{(num_classes - 1) / num_classes:.4f} (the wrong classes would get more mass than the right one)."
        )
    return epsilon


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean cross-entropy against targets with 1 - alpha on the label and alpha / (C - 1) on each other class
    (labels of -100 are ignored). Computed in float32 at least."""
    num_classes = logits.shape[-1]
    epsilon = label_smoothing_epsilon(alpha, num_classes)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.reshape(-1, num_classes), labels.to(logits.device).reshape(-1), label_smoothing=epsilon
    )


@dataclass
class ToSTTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus ToST's mask and its four techniques. The defaults are the full recipe; every technique
    switches off on its own (`ghost_soft_neurons=False`, `ghost_skip_connections=False`, `rescaled_init="none"`,
    `label_smoothing=0`), so "vanilla" sparse training is all four off."""

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
        default=0.9, metadata={"help": "Fraction of the prunable weights (q/k/v/o projections, fc1, fc2) set to zero."}
    )
    mask_scope: str = field(
        default="layer",
        metadata={
            "help": "'layer': the same sparsity in every prunable Linear (default: on a ViT, one global threshold of "
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
        metadata={"help": "Regex on module names selecting the prunable nn.Linear modules (default: ViT projections)."},
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
    ghost_soft_neurons: bool = field(
        default=True,
        metadata={"help": "Start with a softer MLP activation (GELU: x*Phi(lambda x), ReLU: Swish) annealed back."},
    )
    ghost_skip_connections: bool = field(
        default=True, metadata={"help": "Add alpha*G(x) (identity-like, parameter-free) around each sparse Linear."}
    )
    ghost_end_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the optimizer steps after which the ghosts are gone (annealed linearly from the "
            "start). 0.1: they help gradient flow through the early, most fragile phase of sparse training, and "
            "90 % of the budget is left to adapt to the final architecture."
        },
    )
    ghost_activation_lambda: float = field(
        default=0.5, metadata={"help": "Soft neurons: starting sharpness lambda_0 of x*Phi(lambda x) (1 = GELU)."}
    )
    ghost_skip_alpha: float = field(default=1.0, metadata={"help": "Ghost skips: starting scale alpha_0 of G(x)."})
    ghost_skip_schedule: str = field(
        default="linear",
        metadata={"help": f"Ghost skips: alpha from alpha_0 to 0, one of {GHOST_SKIP_SCHEDULES}.",
                  "choices": GHOST_SKIP_SCHEDULES},
    )

    # --- layer-wise rescaled initialisation -----------------------------------------------------------------------
    rescaled_init: str = field(
        default="gradinit",
        metadata={
            "help": f"One of {RESCALED_INIT_METHODS}: GradInit scales learned with a masked look-ahead, the closed "
            "form 1/sqrt(density) per layer, or nothing.",
            "choices": RESCALED_INIT_METHODS,
        },
    )
    rescaled_init_steps: int | None = field(
        default=None,
        metadata={"help": "GradInit iterations. Default min(180, max(1, 2 % of the optimizer steps)); paper: 180."},
    )
    gradinit_lr: float = field(default=1e-2, metadata={"help": "GradInit: Adam learning rate of the scales."})
    gradinit_eta: float = field(default=0.1, metadata={"help": "GradInit: look-ahead step size (normalised gradient)."})
    gradinit_gamma: float = field(
        default=1.0, metadata={"help": "GradInit: above this gradient norm, lower the norm instead of the loss."}
    )
    gradinit_min_scale: float = field(default=0.01, metadata={"help": "GradInit: lower bound of every scale."})

    # --- label smoothing ------------------------------------------------------------------------------------------
    label_smoothing: float = field(
        default=0.1,
        metadata={
            "help": "ToST's alpha: 1 - alpha on the label, alpha/(C-1) on each other class (PyTorch/HF epsilon = "
            "alpha*C/(C-1)). 0 turns it off. Do not combine with `label_smoothing_factor`."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("mask_method", self.mask_method, TOST_MASK_METHODS)
        check_fraction("sparsity", self.sparsity)
        check_choice("mask_scope", self.mask_scope, MASK_SCOPES)
        _check_int("mask_batches", self.mask_batches, minimum=1)
        if self.mask_seed is not None:
            _check_int("mask_seed", self.mask_seed, minimum=0)
        if self.mask_path is not None and not (isinstance(self.mask_path, (str, os.PathLike)) and str(self.mask_path)):
            raise ValueError(f"`mask_path` must be a path, got {self.mask_path!r}.")
        if self.mask_patterns is not None:
            try:
                MaskConfig(patterns=self.mask_patterns)
            except ValueError as error:
                raise ValueError(f"`mask_patterns`: {error}") from error
        _check_int("synflow_rounds", self.synflow_rounds, minimum=1)
        if self.lottery_ticket_rounds is not None:
            _check_int("lottery_ticket_rounds", self.lottery_ticket_rounds, minimum=1)
        check_fraction("lottery_ticket_round_fraction", self.lottery_ticket_round_fraction,
                       low_inclusive=False, high_inclusive=True)
        _check_int("lottery_ticket_rewind_step", self.lottery_ticket_rewind_step, minimum=0)
        for name in ("ghost_soft_neurons", "ghost_skip_connections"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        check_fraction("ghost_end_fraction", self.ghost_end_fraction, low_inclusive=False, high_inclusive=True)
        check_positive("ghost_activation_lambda", self.ghost_activation_lambda)
        check_positive("ghost_skip_alpha", self.ghost_skip_alpha)
        check_choice("ghost_skip_schedule", self.ghost_skip_schedule, GHOST_SKIP_SCHEDULES)
        check_choice("rescaled_init", self.rescaled_init, RESCALED_INIT_METHODS)
        if self.rescaled_init_steps is not None:
            _check_int("rescaled_init_steps", self.rescaled_init_steps, minimum=0)
        for name in ("gradinit_lr", "gradinit_eta", "gradinit_gamma", "gradinit_min_scale"):
            check_positive(name, getattr(self, name))
        check_fraction("label_smoothing", self.label_smoothing)
        if self.label_smoothing > 0 and self.label_smoothing_factor > 0:
            raise ValueError(
                f"`label_smoothing` ({self.label_smoothing}, ToST's alpha/(C-1) convention) and "
                f"`label_smoothing_factor` ({self.label_smoothing_factor}, HF's eps/C) are both set: use one. "
                "For the paper's 0.1 keep `label_smoothing=0.1` and `label_smoothing_factor=0`."
            )

    @property
    def mask_patterns_tuple(self) -> tuple[str, ...]:
        return DEFAULT_PRUNABLE_PATTERNS if self.mask_patterns is None else (self.mask_patterns,)

    @property
    def uses_ghosts(self) -> bool:
        return self.ghost_soft_neurons or self.ghost_skip_connections


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


class _DeviceBatches:
    """Re-iterable view of a DataLoader whose batches are moved to the training device."""

    def __init__(self, loader: DataLoader, prepare) -> None:
        self.loader = loader
        self.prepare = prepare

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.prepare(batch)


class _ToSTCallback(TrainerCallback):
    """Ghost schedule at each step begin, masks re-applied after each optimizer step, ghosts removed at the end."""

    def __init__(self, trainer: ToSTTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        self._trainer()._on_train_begin(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._trainer()._update_ghosts(state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        reapply(self._trainer()._unwrapped_model())

    def on_train_end(self, args, state, control, **kwargs):
        self._trainer()._remove_ghosts(state)


class ToSTTrainer(Trainer):
    """A `Trainer` that trains a weight-sparse model with ToST. Construct it like `Trainer`, with
    `ToSTTrainingArguments`; `train()` masks the model first (see the module docstring).

    Works with SparseViT and HF ViT (prunable Linears `...attention.{q,k,v,o}_proj`, `...mlp.fc1/fc2`, MLP activation
    `mlp.activation_fn`); other models need `mask_patterns` and, for soft neurons, an `mlp.activation_fn`.
    After `train()`, the model keeps its masks (buffers + gradient hooks) so further training stays sparse;
    `save_model` writes the weights with exact zeros, `sparsity_masks.safetensors` beside them, and
    `config.weight_sparsity = {"method", "sparsity", "target_sparsity", "scope"}`.

    Evaluation during the ghost phase sees the network being trained (with its ghosts); after it, and in every saved
    model, the original architecture. The evaluation loss includes the label smoothing, as with HF's
    `label_smoothing_factor`. Data-parallel training (DDP through `accelerate launch`) is supported; FSDP is not.
    Progress goes to the `hf_sparse.trainers.tost` logger (per-layer sparsity, IMP rounds, ghost removal) and to the
    Trainer's logs (`sparsity`, `total_sparsity`, `min_layer_density` at the start, `sparsity` and `ghost_progress`
    with every loss).

    Attributes after `setup_sparsity()` / `train()`:
        sparsity_setup: what was done (mask source and method, seconds spent, GradInit steps, cross-rank check).
        gradinit_report: the `GradInitReport` of the rescaled initialisation (None unless GradInit ran).
        ghost_removed_at_step: the global step at which the ghosts were removed (None while present or unused).
    """

    _tag_names = ["hf_sparse", "tost", "weight-sparsity"]

    def __init__(self, model=None, args: ToSTTrainingArguments | None = None, **kwargs):
        if args is None or not isinstance(args, ToSTTrainingArguments):
            raise ValueError("ToSTTrainer needs `args` of type ToSTTrainingArguments.")
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "ToSTTrainer does not support `model_init`: the mask and rescaled initialisation are applied to the "
                "model given as `model`."
            )
        super().__init__(model=model, args=args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "ToSTTrainer does not support FSDP: weight masks need whole, unsharded parameters. Use DDP "
                "(`accelerate launch --multi_gpu`)."
            )
        config = getattr(self._unwrapped_model(), "config", None)
        if args.label_smoothing > 0:
            if getattr(config, "problem_type", None) in ("regression", "multi_label_classification"):
                raise ValueError("`label_smoothing` applies to single-label classification; set it to 0.")
            if isinstance(getattr(config, "num_labels", None), int):
                label_smoothing_epsilon(args.label_smoothing, config.num_labels)  # raises if too large
            # Our loss is a per-batch mean: the Trainer divides it by the gradient-accumulation steps.
            self.loss_is_scaled_for_ga = False
        self.sparsity_setup: dict[str, Any] | None = None
        self.gradinit_report = None
        self.ghost_removed_at_step: int | None = None
        self._mask_metadata: dict[str, Any] = {}
        self._ghost_handles: list[Any] = []
        self._ghost_schedule = GhostSchedule(args.ghost_end_fraction)
        self._ghost_progress: float | None = None
        self.add_callback(_ToSTCallback(self))

    def _unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _remove_unused_columns(self, dataset, description=None):
        # A `with_transform` data set needs its raw columns (the image) until the transform has run.
        if getattr(dataset, "format", {}).get("type") == "custom":
            return dataset
        return super()._remove_unused_columns(dataset, description)

    # --- loss: label smoothing in the paper's convention ----------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.label_smoothing == 0 or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if labels.is_floating_point():
            raise ValueError("`label_smoothing` applies to integer class labels; set it to 0 for float targets.")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # A per-batch mean (`loss_is_scaled_for_ga=False`): the Trainer scales it for gradient accumulation.
        loss = smoothed_cross_entropy(logits, labels, self.args.label_smoothing)
        return (loss, outputs) if return_outputs else loss

    # --- setup: mask -> sync -> rescaled init ---------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            self._load_checkpoint_masks(str(resume_from_checkpoint))
        elif self.sparsity_setup is None:
            self.setup_sparsity()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def setup_sparsity(self) -> dict[str, Any]:
        """Mask the model, make it identical on every rank and rescale its initialisation (once per trainer).

        `train()` calls it; call it yourself to inspect the masked, rescaled model before training. The global RNG
        states are restored afterwards, so the data order and dropout of training do not depend on the setup (the
        vanilla and ToST runs of one seed see the same batches).
        """
        if self.sparsity_setup is not None:
            return self.sparsity_setup
        args = self.args
        model = self._unwrapped_model()
        setup: dict[str, Any] = {}
        with self._preserved_rng():
            total_steps = self._planned_max_steps()
            setup["planned_steps"] = total_steps
            start = time.perf_counter()
            if get_masks(model):
                setup["mask_source"] = "model"
                self._mask_metadata = {"method": "provided", "patterns": list(args.mask_patterns_tuple)}
            elif args.mask_path is not None:
                setup["mask_source"] = "mask_path"
                self._mask_metadata = dict(load_masks(model, args.mask_path).metadata)
            else:
                setup["mask_source"] = "computed"
                self._mask_metadata = self._compute_masks(model, total_steps)
            setup["mask_seconds"] = time.perf_counter() - start
            setup["masks_identical_across_ranks"] = self._sync_masks(model)

            start = time.perf_counter()
            setup["rescaled_init"] = args.rescaled_init
            if args.rescaled_init == "gradinit":
                steps = args.rescaled_init_steps
                steps = default_rescaled_init_steps(total_steps) if steps is None else steps
                setup["rescaled_init_steps"] = steps
                if steps > 0:
                    model.train()
                    self.gradinit_report = gradinit_rescale(
                        model,
                        self._batches(self._data_seed() + 1),
                        loss_fn=default_loss_fn,
                        steps=steps,
                        lr=args.gradinit_lr,
                        eta=args.gradinit_eta,
                        gamma=args.gradinit_gamma,
                        min_scale=args.gradinit_min_scale,
                    )
                    setup["gradinit_loss_before"] = self.gradinit_report.loss_before
                    setup["gradinit_loss_after"] = self.gradinit_report.loss_after
            elif args.rescaled_init == "density":
                density_rescale(model)
            reapply(model)
            self._broadcast_parameters(model)
            setup["rescaled_init_seconds"] = time.perf_counter() - start

        self._record_sparsity_metadata(model)
        report = sparsity_report(model)
        setup["mask_sparsity"] = mask_sparsity(get_masks(model))
        setup["prunable_sparsity"] = report["prunable_sparsity"]
        setup["total_sparsity"] = report["total_sparsity"]
        self._log_layers(report)
        self.sparsity_setup = setup
        return setup

    def _data_seed(self) -> int:
        return self.args.mask_seed if self.args.mask_seed is not None else self.args.seed

    @contextlib.contextmanager
    def _preserved_rng(self):
        device = self.args.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def _planned_max_steps(self) -> int:
        """The optimizer steps `train()` will run (the Trainer's own formula)."""
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        batches = len(self.get_train_dataloader())
        accumulation = args.gradient_accumulation_steps
        per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
        return math.ceil(args.num_train_epochs * per_epoch)

    def _batches(self, seed: int, shard: bool = False) -> _DeviceBatches | Iterator[dict[str, Any]]:
        """Training batches in a seeded order, independent of the Trainer's sampler and of the global RNG.

        Unsharded (the same batches on every rank) for scores and GradInit; `shard=True` gives each rank its own
        slice of one global order (IMP rounds, whose gradients are averaged across ranks), cycling forever.
        """
        if self.train_dataset is None:
            raise ValueError("ToSTTrainer needs a `train_dataset` to compute masks and rescale the initialisation.")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover - datasets is a dependency
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="mask/rescale")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="mask/rescale")
        batch_size = self.args.per_device_train_batch_size
        rank, world = (self.accelerator.process_index, self.accelerator.num_processes) if shard else (0, 1)

        def loader(epoch: int) -> DataLoader:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(dataset), generator=generator)[rank::world].tolist()
            return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collator, num_workers=0)

        if not shard:
            return _DeviceBatches(_ReseededLoader(loader), self._prepare_inputs)

        def forever() -> Iterator[dict[str, Any]]:
            epoch = 0
            while True:
                for batch in loader(epoch):
                    yield self._prepare_inputs(batch)
                epoch += 1

        return forever()

    def _compute_masks(self, model: nn.Module, total_steps: int) -> dict[str, Any]:
        args = self.args
        model.train()
        if args.mask_method == "lottery_ticket":
            return self._lottery_ticket(model, total_steps)
        config = MaskConfig(
            method=args.mask_method,
            sparsity=args.sparsity,
            scope=args.mask_scope,
            patterns=args.mask_patterns_tuple,
            num_batches=args.mask_batches,
            synflow_rounds=args.synflow_rounds,
            seed=self._data_seed(),
        )
        needs_data = args.mask_method in ("snip", "grasp", "synflow")
        handle = prune_model(model, config, batches=self._batches(self._data_seed()) if needs_data else None)
        return dict(handle.metadata)

    # --- lottery ticket: iterative magnitude pruning with rewinding -----------------------------------------------

    def _lottery_ticket(self, model: nn.Module, total_steps: int) -> dict[str, Any]:
        args = self.args
        patterns = args.mask_patterns_tuple
        if args.sparsity == 0:
            linears = find_prunable_linears(model, patterns)
            masks = {name: torch.ones_like(module.weight, dtype=torch.bool) for name, module in linears.items()}
            apply_masks(model, masks)
            return {"method": "lottery_ticket", "target_sparsity": 0.0, "rounds": 0, "scope": args.mask_scope,
                    "patterns": list(patterns)}
        rounds = args.lottery_ticket_rounds or rounds_for_sparsity(args.sparsity)
        prune_fraction = 1.0 - (1.0 - args.sparsity) ** (1.0 / rounds)
        round_steps = max(1, math.ceil(args.lottery_ticket_round_fraction * total_steps))
        rewind_step = args.lottery_ticket_rewind_step
        if rewind_step > round_steps:
            raise ValueError(
                f"`lottery_ticket_rewind_step` ({rewind_step}) exceeds the optimizer steps of an IMP round "
                f"({round_steps} = lottery_ticket_round_fraction x {total_steps}); lower it or raise the fraction."
            )
        stream = self._batches(self._data_seed() + 2, shard=True)
        rewind_state = None
        if rewind_step > 0:  # round 1 runs here, saving the weights at the rewind step on the way
            rewind_state = self._imp_round(model, round_steps, stream, snapshot_step=rewind_step)
        trained_rounds = [0]

        def train_fn(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
            trained_rounds[0] += 1
            if rewind_state is not None and trained_rounds[0] == 1:
                return  # already trained above
            self._imp_round(model, round_steps, stream)

        def on_round_end(round_index: int, report: dict[str, Any]) -> None:
            if self.is_world_process_zero():
                logger.info("Lottery ticket round %d/%d (%d steps): sparsity %.4f", round_index, rounds, round_steps,
                            report["prunable_sparsity"])

        handle = iterative_magnitude_pruning(
            model,
            train_fn,
            rounds,
            prune_fraction_per_round=prune_fraction,
            rewind="step" if rewind_state is not None else "init",
            rewind_state=rewind_state,
            scope=args.mask_scope,
            patterns=patterns,
            on_round_end=on_round_end,
        )
        metadata = dict(handle.metadata)
        metadata.update(target_sparsity=args.sparsity, round_steps=round_steps, rewind_step=rewind_step)
        return metadata

    def _imp_round(self, model: nn.Module, steps: int, stream: Iterator[dict[str, Any]],
                   snapshot_step: int | None = None) -> dict[str, torch.Tensor] | None:
        """Dense(-within-the-mask) training for one IMP round: the run's optimizer type, hyper-parameters, schedule
        shape, gradient accumulation, clipping and mixed precision, with gradients averaged across ranks. Plain
        cross-entropy (no ToST technique: those apply to the final sparse training)."""
        args = self.args
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, model)
        decay = set(self.get_decay_parameter_names(model))
        groups = [
            {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
             "weight_decay": args.weight_decay},
            {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
             "weight_decay": 0.0},
        ]
        optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs if isinstance(args.lr_scheduler_kwargs, dict) else None,
        )
        scaler = torch.amp.GradScaler(args.device.type) if args.fp16 else None
        world = self.accelerator.num_processes
        snapshot = None
        model.train()
        for step in range(1, steps + 1):
            for _ in range(args.gradient_accumulation_steps):
                with self.accelerator.autocast():
                    loss = default_loss_fn(model, next(stream)) / args.gradient_accumulation_steps
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if world > 1:
                for parameter in model.parameters():
                    if parameter.grad is not None:
                        torch.distributed.all_reduce(parameter.grad)
                        parameter.grad.div_(world)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if args.max_grad_norm and args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            reapply(model)
            if snapshot_step == step:
                snapshot = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        return snapshot

    # --- identical masks and weights on every rank ----------------------------------------------------------------

    def _sync_masks(self, model: nn.Module) -> bool:
        """Broadcast rank 0's masks; return whether every rank already had exactly them (always True on one rank)."""
        if self.accelerator.num_processes <= 1 or not torch.distributed.is_initialized():
            return True
        mismatches = torch.zeros((), dtype=torch.long, device=self.args.device)
        for mask in get_masks(model).values():
            received = mask.to(torch.uint8)  # gloo has no bool broadcast
            torch.distributed.broadcast(received, src=0)
            received = received.bool()
            mismatches += (received != mask).sum()
            mask.copy_(received)
        reapply(model)
        torch.distributed.all_reduce(mismatches)
        identical = int(mismatches) == 0
        if not identical and self.is_world_process_zero():
            logger.warning("Masks differed across ranks in %d entries (non-deterministic scores?); rank 0's are used.",
                           int(mismatches))
        return identical

    def _broadcast_parameters(self, model: nn.Module) -> None:
        if self.accelerator.num_processes <= 1 or not torch.distributed.is_initialized():
            return
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                if tensor.dtype == torch.bool:
                    received = tensor.to(torch.uint8)
                    torch.distributed.broadcast(received, src=0)
                    tensor.copy_(received.bool())
                else:
                    torch.distributed.broadcast(tensor.data, src=0)

    # --- resume ---------------------------------------------------------------------------------------------------

    def _load_checkpoint_masks(self, checkpoint: str) -> None:
        path = Path(checkpoint) / MASKS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"Cannot resume ToST training from {checkpoint}: it has no {MASKS_FILENAME} (the weight masks). "
                "Resume from a checkpoint written by ToSTTrainer."
            )
        model = self._unwrapped_model()
        start = time.perf_counter()
        self._mask_metadata = dict(load_masks(model, path).metadata)
        self._record_sparsity_metadata(model)
        report = sparsity_report(model)
        self.sparsity_setup = {
            "mask_source": "checkpoint",
            "checkpoint": str(checkpoint),
            "mask_seconds": time.perf_counter() - start,
            "rescaled_init": "from checkpoint",
            "rescaled_init_seconds": 0.0,
            "masks_identical_across_ranks": True,  # every rank reads the same file
            "mask_sparsity": mask_sparsity(get_masks(model)),
            "prunable_sparsity": report["prunable_sparsity"],
            "total_sparsity": report["total_sparsity"],
        }

    # --- ghosts ---------------------------------------------------------------------------------------------------

    def _training_progress(self, state) -> float:
        return state.global_step / max(1, state.max_steps)

    def _on_train_begin(self, state) -> None:
        model = self._unwrapped_model()
        report = sparsity_report(model)
        densities = [1.0 - value for value in report["layers"].values()]
        self.log({
            "sparsity": round(report["prunable_sparsity"], 6),
            "total_sparsity": round(report["total_sparsity"], 6),
            "min_layer_density": round(min(densities), 6) if densities else 1.0,
        })
        if not self.args.uses_ghosts:
            return
        progress = self._training_progress(state)
        if self._ghost_schedule.is_finished(progress):
            self._ghost_progress = 1.0
            return
        ghost_progress = self._ghost_schedule(progress)
        args = self.args
        handles = []
        try:
            if args.ghost_soft_neurons:
                handles.append(attach_ghost_activations(model, lambda_0=args.ghost_activation_lambda,
                                                        progress=ghost_progress))
            if args.ghost_skip_connections:
                handles.append(attach_ghost_skips(model, alpha_0=args.ghost_skip_alpha,
                                                  schedule=args.ghost_skip_schedule, progress=ghost_progress))
        except ValueError as error:
            for handle in handles:
                handle.remove()
            raise ValueError(f"`ghost_soft_neurons`/`ghost_skip_connections` cannot be attached: {error}") from error
        self._ghost_handles = handles
        self._ghost_progress = ghost_progress
        if self.is_world_process_zero():
            logger.info("Ghosts attached at step %d (progress %.3f); removed after %d%% of the %d steps.",
                        state.global_step, ghost_progress, round(100 * args.ghost_end_fraction), state.max_steps)

    def _update_ghosts(self, state) -> None:
        if not self._ghost_handles:
            return
        progress = self._training_progress(state)
        if self._ghost_schedule.update(progress, *self._ghost_handles):
            self._ghost_handles = []
            self.ghost_removed_at_step = state.global_step
            if self.is_world_process_zero():
                logger.info("Ghosts removed at step %d: the model is back to its own architecture.", state.global_step)
        self._ghost_progress = self._ghost_schedule(progress)

    def _remove_ghosts(self, state) -> None:
        if self._ghost_handles:
            for handle in self._ghost_handles:
                handle.remove()
            self._ghost_handles = []
            if self._ghost_progress is not None and self._ghost_progress >= 1.0:
                self.ghost_removed_at_step = state.global_step

    @property
    def mask_metadata(self) -> dict[str, Any]:
        """What `save_model` writes into the mask file's metadata (method, target sparsity, scope, patterns, recipe)."""
        return dict(self._mask_metadata)

    @property
    def ghosts_active(self) -> bool:
        return bool(self._ghost_handles)

    # --- logging --------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            masked = [module.weight for module in masked_modules(self._unwrapped_model()).values()]
            if masked:
                zeros = sum(int((weight == 0).sum()) for weight in masked)
                logs["sparsity"] = round(zeros / sum(weight.numel() for weight in masked), 6)
            if self._ghost_progress is not None:
                logs["ghost_progress"] = round(self._ghost_progress, 4)
        super().log(logs, *args, **kwargs)

    def _log_layers(self, report: dict[str, Any]) -> None:
        collapsed = [name for name, value in report["layers"].items() if value >= 1.0]
        if collapsed:
            logger.warning(
                "%d prunable layers are entirely pruned (layer collapse), e.g. %s; use `mask_scope='layer'` or a "
                "lower `sparsity`.", len(collapsed), collapsed[:4]
            )
        if not self.is_world_process_zero():
            return
        logger.info(
            "ToST mask (%s, %s): prunable sparsity %.4f, total sparsity %.4f (%d of %d parameters are zero)",
            self._mask_metadata.get("method"), self._mask_metadata.get("scope", self.args.mask_scope),
            report["prunable_sparsity"], report["total_sparsity"], report["total_zeros"], report["total_params"],
        )
        for name, value in report["layers"].items():
            logger.info("  %-60s sparsity %.4f", name, value)

    # --- saving: weights with exact zeros, the masks beside them, the mask summary in the config ------------------

    def _record_sparsity_metadata(self, model: nn.Module) -> None:
        masks = get_masks(model)
        target = self._mask_metadata.get("target_sparsity", self.args.sparsity)
        summary = {
            "method": self._mask_metadata.get("method", "provided"),
            "sparsity": round(mask_sparsity(masks), 6),
            "target_sparsity": target,
            "scope": self._mask_metadata.get("scope", self.args.mask_scope),
        }
        self._mask_metadata.setdefault("target_sparsity", target)
        self._mask_metadata["tost"] = {
            "ghost_soft_neurons": self.args.ghost_soft_neurons,
            "ghost_skip_connections": self.args.ghost_skip_connections,
            "ghost_end_fraction": self.args.ghost_end_fraction,
            "rescaled_init": self.args.rescaled_init,
            "label_smoothing": self.args.label_smoothing,
        }
        config = getattr(model, "config", None)
        if config is not None:
            config.weight_sparsity = summary

    def training_report(self) -> TrainingReport:
        """The card's account of this run; fields a caller set on `model.hf_sparse_report` are kept."""
        model = self._unwrapped_model()
        report = getattr(model, "hf_sparse_report", None) or TrainingReport()
        report.method = "tost"
        accuracies = [entry["eval_accuracy"] for entry in self.state.log_history if "eval_accuracy" in entry]
        if accuracies:
            report.test_accuracy = accuracies[-1]
        runtimes = [entry["train_runtime"] for entry in self.state.log_history if "train_runtime" in entry]
        if runtimes:
            report.train_seconds = report.train_seconds or runtimes[-1]
        args = self.args
        report.settings.update(
            {
                "mask method": (self._mask_metadata or {}).get("method", args.mask_method),
                "ghost soft neurons": args.ghost_soft_neurons,
                "ghost skip connections": args.ghost_skip_connections,
                "ghosts removed after": f"{args.ghost_end_fraction:g} of training",
                "rescaled init": args.rescaled_init,
                "label smoothing (alpha / (C-1) per wrong class)": args.label_smoothing,
            }
        )
        model.hf_sparse_report = report
        return report

    def create_model_card(self, *args, **kwargs) -> None:
        """Our card (mask, ghosts, rescaled init, measured results) instead of the Trainer's generic one."""
        if not self.is_world_process_zero():
            return
        self.training_report()
        write_save_extras(self._unwrapped_model(), self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self.training_report()
        model = self._unwrapped_model()
        if get_masks(model):
            reapply(model)  # exact zeros in the saved weights, whatever wrote them
        super().save_model(output_dir, _internal_call)
        if get_masks(model) and self.args.should_save:
            save_masks(model, output_dir or self.args.output_dir, metadata=self._mask_metadata)


class _ReseededLoader:
    """Iterating it again gives the next epoch of a seeded order (so `BatchCycler` restarts see fresh batches)."""

    def __init__(self, make_loader) -> None:
        self._make_loader = make_loader
        self._epoch = 0

    def __iter__(self):
        loader = self._make_loader(self._epoch)
        self._epoch += 1
        return iter(loader)


__all__ = [
    "RESCALED_INIT_METHODS",
    "TOST_MASK_METHODS",
    "ToSTTrainer",
    "ToSTTrainingArguments",
    "default_rescaled_init_steps",
    "label_smoothing_epsilon",
    "smoothed_cross_entropy",
]
