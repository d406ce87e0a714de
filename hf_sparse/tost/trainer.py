"""`ToSTTrainer`: "Training Your Sparse Neural Network Better with Any Mask" (Jaiswal et al., ICML 2022).

Order of events, at the start of `train()` (see `ToSTTrainer.setup_sparsity` and `tost/setup.py`):

1. weight mask: computed (random, magnitude, SNIP, GraSP, SynFlow, or a lottery ticket by iterative magnitude
   pruning with rewinding), or loaded from `mask_path`, or taken from the model if it already carries masks;
2. the masks (and then the weights) are made identical on every rank: each rank computes them with the same seed
   and data order, then rank 0's are broadcast and the ranks that differed are counted (`masks_identical_across_ranks`);
3. layer-wise rescaled initialisation: GradInit with a masked look-ahead (`gradinit`), or 1/sqrt(density) (`density`);
4. ghost soft neurons and ghost skip connections (`GhostCallback`), attached when training begins and annealed off by
   `ghost_end_fraction` of the optimizer steps, then removed: the original activation modules come back and the
   skip hooks are deleted, so the final architecture, `state_dict` keys and parameter count are the model's own;
5. training with label smoothing in the paper's convention and masked gradients (a gradient hook per masked weight,
   plus `MaskCallback` after every optimizer step, so pruned weights stay exactly zero).

Resuming from a checkpoint reloads the masks saved beside its weights (`sparsity_masks.safetensors`) and redoes
neither the mask nor the rescaled initialisation (the checkpoint's weights already include them); ghost progress is a
function of the global step, so a resumed run continues the schedule exactly.

What differs from the public ToST code, on purpose: the ghosts really are annealed and removed; the GradInit
look-ahead is masked and always runs after masking; the ViT's ghost skips are parameter-free identity-like maps
(nothing to fold back; a CNN's are the authors' trainable 1x1 branches, deleted with their optimizer state); label
smoothing is the paper's alpha / (C - 1) on each wrong class; nothing is computed before masking.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from ..logging_utils import get_logger
from ..trainers.base import SparseTrainer
from .arguments import ToSTTrainingArguments
from .batches import SeededBatches
from .ghosts import GhostCallback
from .label_smoothing import label_smoothing_epsilon, smoothed_cross_entropy
from .masks import MASKS_FILENAME, MaskCallback, get_masks, load_masks, mask_sparsity, model_family
from .masks import masked_weight_sparsity
from .masks import reapply
from .masks import save_masks, sparsity_report
from .setup import broadcast_parameters, compute_masks_for, lottery_ticket, rescale_initialisation, sync_masks

logger = get_logger(__name__)


class ToSTTrainer(SparseTrainer):
    """A `Trainer` that trains a weight-sparse model with ToST. Construct it like `Trainer`, with
    `ToSTTrainingArguments`; `train()` masks the model first (see the module docstring).

    Works with SparseViT and HF ViT (prunable Linears `...attention.{q,k,v,o}_proj`, `...mlp.fc1/fc2`, MLP activation
    `mlp.activation_fn`) and with CNNs such as transformers' `ResNetForImageClassification` (every convolution after
    the stem; every ReLU becomes a ghost); other models may need `mask_patterns`.
    After `train()`, the model keeps its masks (buffers + gradient hooks) so further training stays sparse;
    `save_model` writes the weights with exact zeros, `sparsity_masks.safetensors` beside them, and
    `config.weight_sparsity = {"method", "sparsity", "target_sparsity", "scope"}`.

    Evaluation during the ghost phase sees the network being trained (with its ghosts); after it, and in every saved
    model, the original architecture. The evaluation loss includes the label smoothing, as with HF's
    `label_smoothing_factor`. Data-parallel training (DDP through `accelerate launch`) and FSDP2 (`fsdp_version: 2`)
    are supported; FSDP1, DeepSpeed ZeRO-3 and a model sharded beforehand are refused at construction.
    Progress goes to the `hf_sparse.tost` loggers at INFO, shown with `log_level="info"` as transformers' own messages
    are (per-layer sparsity, each IMP round once, ghosts attached and removed, the rescaled initialisation), and to
    the Trainer's logs (`sparsity` and `ghost_progress` with every loss).

    Attributes after `setup_sparsity()` / `train()`:
        sparsity_setup: what was done (mask source and method, seconds spent, GradInit steps, cross-rank check,
            measured sparsity).
        gradinit_report: the `GradInitReport` of the rescaled initialisation (None unless GradInit ran).
        ghosts: the `GhostCallback` (its `progress` and `removed_at_step`).
        mask_metadata: what the mask file's metadata records (method, target sparsity, scope, patterns, recipe).
    """

    arguments_class = ToSTTrainingArguments
    method = "tost"
    _tag_names = ["hf_sparse", "tost", "weight-sparsity"]

    def __init__(self, model=None, args: ToSTTrainingArguments | None = None, **kwargs):
        if isinstance(args, ToSTTrainingArguments) and model is not None:
            # The recipe fields left unset take the best measured settings for the model's family, in a copy: the
            # caller's arguments can serve another model (another family) unchanged.
            self.family = model_family(model)
            args = copy.copy(args)
            single_label = getattr(getattr(model, "config", None), "problem_type", None) in (
                None, "single_label_classification")
            args.apply_family_recipe(self.family, single_label=single_label)
            if not (args.ghost_soft_neurons or args.ghost_skip_connections or args.label_smoothing
                    or args.rescaled_init != "none"):
                logger.info("ToST: every technique is off (vanilla sparse training with the mask): the measured recipe "
                            "of the %s family, or your settings. Set ghost_soft_neurons, ghost_skip_connections, "
                            "rescaled_init or label_smoothing to use them.", self.family)
        super().__init__(model=model, args=args, **kwargs)
        self._check_sharding()
        config = getattr(self.unwrapped_model, "config", None)
        if args.label_smoothing > 0:
            if getattr(config, "problem_type", None) in ("regression", "multi_label_classification"):
                raise ValueError("`label_smoothing` applies to single-label classification; set it to 0.")
            if isinstance(getattr(config, "num_labels", None), int):
                label_smoothing_epsilon(args.label_smoothing, config.num_labels)  # raises if too large
        self.sparsity_setup: dict[str, Any] | None = None
        self.gradinit_report = None
        self.mask_metadata: dict[str, Any] = {}
        self.ghosts = GhostCallback(
            soft_neurons=args.ghost_soft_neurons,
            skip_connections=args.ghost_skip_connections,
            end_fraction=args.ghost_end_fraction,
            activation_lambda=args.ghost_activation_lambda,
            skip_alpha=args.ghost_skip_alpha,
            skip_schedule=args.ghost_skip_schedule,
        )
        self.add_callback(self.ghosts)
        self.add_callback(MaskCallback())

    def _check_sharding(self) -> None:
        """Refuse, before any step, the sharding under which masks cannot stay right: FSDP1, DeepSpeed ZeRO-3, a
        model sharded before it reached the trainer, and the lottery ticket's whole-parameter rounds under any FSDP or
        DeepSpeed. FSDP2 through accelerate is supported (see `masks/model.py`)."""
        instead = ("Use FSDP2 (`fsdp_version: 2` in accelerate's config, or `fsdp_config={'version': 2}`) or DDP "
                   "(`accelerate launch --multi_gpu`).")
        # From the accelerator's state, not `args.fsdp`: `accelerate launch --config_file fsdp.yaml` leaves that None.
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        fsdp = getattr(self, "is_fsdp_enabled", False) or fsdp_plugin is not None
        deepspeed = getattr(self, "is_deepspeed_enabled", False)
        if fsdp:
            version = getattr(fsdp_plugin, "fsdp_version", 1)
            if version != 2:
                raise ValueError(
                    f"ToSTTrainer does not support FSDP{version}: it flattens the weights, so the weight masks cannot "
                    f"follow them. {instead}"
                )
        if self.args.mask_method == "lottery_ticket" and (fsdp or deepspeed):
            raise ValueError(
                f"`mask_method='lottery_ticket'` does not support {'FSDP' if fsdp else 'DeepSpeed'}: its rounds train "
                "whole parameters before the run shards them. Use DDP (`accelerate launch --multi_gpu`) or another "
                "`mask_method`."
            )
        if deepspeed:
            stage = getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", None)
            if stage == 3:
                raise ValueError(
                    f"ToSTTrainer does not support DeepSpeed ZeRO-3: it partitions the weights outside the masks' "
                    f"reach. {instead}"
                )
        model = self.model  # as given: `unwrapped_model` would already look inside an FSDP1 wrapper
        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            raise ValueError(f"ToSTTrainer got a model wrapped in FSDP1 (`FullyShardedDataParallel`). {instead}")
        if any(isinstance(module, FSDPModule) for module in model.modules()) or any(
            isinstance(parameter, DTensor) for parameter in model.parameters()
        ):
            raise ValueError(
                "ToSTTrainer got a model that is already sharded (`fully_shard` or DTensor parameters): the masks are "
                "computed on whole weights before sharding. Pass the unsharded model and let the Trainer shard it "
                "(FSDP2: `fsdp_version: 2` in accelerate's config), or, without the Trainer, apply the masks before "
                "`fully_shard` and call `reapply(model)` after it."
            )

    @property
    def ghost_removed_at_step(self) -> int | None:
        """The global step at which the ghosts were removed (None while present or unused)."""
        return self.ghosts.removed_at_step

    # --- loss: label smoothing in the paper's convention ----------------------------------------------------------

    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.args.label_smoothing == 0:
            return super().per_example_loss(logits, labels)
        return smoothed_cross_entropy(logits, labels, self.args.label_smoothing, reduction="none")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if labels.is_floating_point():
            if self.args.label_smoothing > 0:
                raise ValueError("`label_smoothing` applies to integer class labels; set it to 0 for float targets.")
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        per_example, outputs = self.classification_loss(model, inputs)
        loss = per_example.mean()  # a per-batch mean (`loss_is_scaled_for_ga=False`)
        return (loss, outputs) if return_outputs else loss

    # --- setup: mask -> sync -> rescaled init ---------------------------------------------------------------------

    def _prepare_training(self, resume_from_checkpoint: str | None) -> None:
        self.ghosts.resume_checkpoint = resume_from_checkpoint  # the CNN ghost branches' weights, within the phase
        if resume_from_checkpoint is not None:
            self._load_checkpoint_masks(resume_from_checkpoint)
        elif self.sparsity_setup is None:
            self.setup_sparsity()

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        # the CNN ghost branches train with the run: their groups exist before the schedule and a resumed state
        self.ghosts.add_branches_to_optimizer(self.unwrapped_model, optimizer, self.state, self.args)
        return optimizer

    def planned_steps(self) -> int:
        """The optimizer steps `train()` will run (the Trainer's own count)."""
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    def setup_sparsity(self) -> dict[str, Any]:
        """Mask the model, make it identical on every rank and rescale its initialisation (once per trainer).

        `train()` calls it; call it yourself to inspect the masked, rescaled model before training. The global RNG
        states are restored afterwards, so the data order and dropout of training do not depend on the setup (the
        vanilla and ToST runs of one seed see the same batches).
        """
        if self.sparsity_setup is not None:
            return self.sparsity_setup
        if self.train_dataset is None:
            raise ValueError("ToSTTrainer needs a `train_dataset` to compute masks and rescale the initialisation.")
        args, model = self.args, self.unwrapped_model
        setup: dict[str, Any] = {}
        with self._preserved_rng():
            total_steps = self.planned_steps()
            setup["planned_steps"] = total_steps
            start = time.perf_counter()
            if get_masks(model):
                setup["mask_source"] = "model"
                self.mask_metadata = {"method": "provided", "patterns": list(args.mask_patterns_tuple)}
            elif args.mask_path is not None:
                setup["mask_source"] = "mask_path"
                self.mask_metadata = dict(load_masks(model, args.mask_path).metadata)
            elif args.mask_method == "lottery_ticket":
                setup["mask_source"] = "computed"
                self.mask_metadata = lottery_ticket(model, args, total_steps, self.train_dataset, self.data_collator,
                                                    is_main_process=self.is_world_process_zero())
            else:
                setup["mask_source"] = "computed"
                self.mask_metadata = compute_masks_for(model, args, self.scoring_batches(self.args.mask_data_seed))
            setup["mask_seconds"] = time.perf_counter() - start
            setup["masks_identical_across_ranks"] = sync_masks(model, self.accelerator)

            start = time.perf_counter()
            self.gradinit_report, done = rescale_initialisation(
                model, args, self.scoring_batches(self.args.mask_data_seed + 1), total_steps
            )
            setup.update(done)
            broadcast_parameters(model, self.accelerator)
            setup["rescaled_init_seconds"] = time.perf_counter() - start
        self.sparsity_setup = {**setup, **self._record_sparsity(model)}
        return self.sparsity_setup

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

    def scoring_batches(self, seed: int) -> SeededBatches:
        """Training batches in a seeded order, the same on every rank, for mask scores and GradInit."""
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
        return SeededBatches(dataset, collator, self.args.per_device_train_batch_size, seed, self._prepare_inputs)

    def _load_checkpoint_masks(self, checkpoint: str) -> None:
        path = Path(checkpoint) / MASKS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"Cannot resume ToST training from {checkpoint}: it has no {MASKS_FILENAME} (the weight masks). "
                "Resume from a checkpoint written by ToSTTrainer."
            )
        model = self.unwrapped_model
        start = time.perf_counter()
        self.mask_metadata = dict(load_masks(model, path).metadata)
        setup = {
            "mask_source": "checkpoint",
            "checkpoint": str(checkpoint),
            "mask_seconds": time.perf_counter() - start,
            "rescaled_init": "from checkpoint",
            "rescaled_init_seconds": 0.0,
            "masks_identical_across_ranks": True,  # every rank reads the same file
        }
        self.sparsity_setup = {**setup, **self._record_sparsity(model, log_layers=False)}

    def _record_sparsity(self, model: torch.nn.Module, log_layers: bool = True) -> dict[str, Any]:
        """Note the mask and recipe in the metadata and `config.weight_sparsity`; return the measured sparsity."""
        masks = get_masks(model)
        provided = self.mask_metadata.get("method") == "provided"
        target = self.mask_metadata.get("target_sparsity", None if provided else self.args.sparsity)
        self.mask_metadata.setdefault("target_sparsity", target)
        args = self.args
        self.mask_metadata["tost"] = {
            "ghost_soft_neurons": args.ghost_soft_neurons,
            "ghost_skip_connections": args.ghost_skip_connections,
            "ghost_end_fraction": args.ghost_end_fraction,
            "rescaled_init": args.rescaled_init,
            "label_smoothing": args.label_smoothing,
        }
        config = getattr(model, "config", None)
        if config is not None:
            config.weight_sparsity = {
                "method": self.mask_metadata.get("method", "provided"),
                "sparsity": round(mask_sparsity(masks), 6),
                "target_sparsity": target,
                "scope": self.mask_metadata.get("scope", args.mask_scope),
            }
        report = sparsity_report(model)
        if log_layers:
            self._log_layers(report)
        return {
            "mask_sparsity": mask_sparsity(masks),
            "prunable_sparsity": report["prunable_sparsity"],
            "total_sparsity": report["total_sparsity"],
        }

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
            self.mask_metadata.get("method"), self.mask_metadata.get("scope", self.args.mask_scope),
            report["prunable_sparsity"], report["total_sparsity"], report["total_zeros"], report["total_params"],
        )
        for name, value in report["layers"].items():
            logger.info("  %-60s sparsity %.4f", name, value)

    # --- logging --------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            sparsity = masked_weight_sparsity(self.unwrapped_model)  # one host sync, no module walk
            if sparsity is not None:
                logs["sparsity"] = round(sparsity, 6)
            if self.ghosts.progress is not None:
                logs["ghost_progress"] = round(self.ghosts.progress, 4)
        super().log(logs, *args, **kwargs)

    # --- saving: weights with exact zeros, the masks beside them, the mask summary in the config ------------------

    def report_settings(self) -> dict[str, Any]:
        """The card's rows for ToST's four techniques (the mask is `config.weight_sparsity`'s rows). Label smoothing
        is the paper's alpha: alpha / (C - 1) on each wrong class."""
        args = self.args
        return {
            "ghost soft neurons": args.ghost_soft_neurons,
            "ghost skip connections": args.ghost_skip_connections,
            **({"ghosts removed after": f"{args.ghost_end_fraction:g} of training"} if args.uses_ghosts else {}),
            "rescaled init": args.rescaled_init,
            "label smoothing": args.label_smoothing,
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if get_masks(self.unwrapped_model):
            reapply(self.unwrapped_model, exact=True)  # exact zeros in the saved weights, whatever wrote them
        super().save_model(output_dir, _internal_call)

    def save_method_state(self, directory: str) -> None:
        if get_masks(self.unwrapped_model):
            save_masks(self.unwrapped_model, directory, metadata=self.mask_metadata)
