"""ToST's set-up before sparse training: mask -> identical on every rank -> rescaled initialisation.

Plain functions of the model, the arguments, batches and the `Accelerator`; the trainer calls them in that order.
Lottery-ticket rounds are trained by a plain `transformers.Trainer` (the run's optimizer, schedule, gradient
accumulation, clipping, mixed precision and DDP), so there is no second training loop to keep right.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from accelerate.utils import broadcast
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from ..logging_utils import get_logger, transformers_verbosity_at_least
from .arguments import ToSTTrainingArguments, default_rescaled_init_steps
from .batches import default_loss_fn
from .masks import (
    MaskCallback,
    MaskConfig,
    apply_masks,
    find_prunable_layers,
    get_masks,
    iterative_magnitude_pruning,
    prune_model,
    reapply,
    rounds_for_sparsity,
)
from .rescaled_init import GradInitReport, density_rescale, gradinit_rescale

logger = get_logger(__name__)

DATA_METHODS = ("snip", "grasp", "synflow")  # mask methods that read training batches


def compute_masks_for(model: nn.Module, args: ToSTTrainingArguments, batches: Iterable[Any] | None) -> dict:
    """Prune `model` at initialisation with `args.mask_method` (not the lottery ticket); returns the metadata."""
    config = MaskConfig(
        method=args.mask_method,
        sparsity=args.sparsity,
        scope=args.mask_scope,
        patterns=args.mask_patterns_tuple,
        num_batches=args.mask_batches,
        synflow_rounds=args.synflow_rounds,
        seed=args.mask_data_seed,
    )
    model.train()
    return dict(prune_model(model, config, batches=batches if args.mask_method in DATA_METHODS else None).metadata)


# --- lottery ticket: iterative magnitude pruning with rewinding, rounds trained by a plain Trainer ----------------


class _Snapshot(TrainerCallback):
    """Keeps a copy of the weights after `step` optimizer steps (late rewinding)."""

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.state_dict: dict[str, torch.Tensor] | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def round_arguments(args: TrainingArguments, steps: int, total_steps: int, round_index: int,
                    keep_columns: bool) -> TrainingArguments:
    """Plain `TrainingArguments` for one dense(-within-the-mask) round: this run's optimizer, schedule shape,
    accumulation, clipping and precision over `steps` (an absolute warm-up scaled to the round), with no saving,
    evaluation, logging (nor a change of the log level) or label smoothing, and a seed and data order of the round's
    own."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ValueError(
            "`mask_method='lottery_ticket'` does not support DeepSpeed or FSDP: its rounds train whole parameters "
            "before the run shards them. Use DDP (`accelerate launch --multi_gpu`) or another `mask_method`."
        )
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    warmup = args.warmup_steps
    if isinstance(warmup, int) and warmup >= 1:
        warmup = round(warmup * steps / max(1, total_steps))
    seed = args.mask_data_seed + 2 + round_index
    values.update(
        max_steps=steps, warmup_steps=warmup, save_strategy="no", eval_strategy="no", eval_on_start=False,
        logging_strategy="no", log_level="passive", log_level_replica="passive", report_to=[], disable_tqdm=True,
        push_to_hub=False, load_best_model_at_end=False,
        label_smoothing_factor=0.0, seed=seed, data_seed=seed,
        remove_unused_columns=args.remove_unused_columns and not keep_columns, resume_from_checkpoint=None,
    )
    return TrainingArguments(**values)


def lottery_ticket(
    model: nn.Module,
    args: ToSTTrainingArguments,
    total_steps: int,
    train_dataset: Any,
    data_collator: Any,
    is_main_process: bool = True,
) -> dict[str, Any]:
    """Find the lottery ticket of `args.sparsity` on `model` and leave it rewound and masked; returns the metadata.

    `rounds` (default: the fewest with 1 - 0.8^k >= sparsity) each train for `lottery_ticket_round_fraction` of the
    run's steps, then prune 1 - (1 - sparsity)^(1/rounds) of the survivors by magnitude and rewind (to the initial
    weights, or to those after `lottery_ticket_rewind_step` steps of the first round). Logged at INFO: the plan, then
    each round once ("IMP round 3/11, sparsity 0.488"); the rounds' own Trainers print nothing below WARNING.
    """
    patterns = args.mask_patterns_tuple
    if args.sparsity == 0:
        layers = find_prunable_layers(model, patterns)
        apply_masks(model, {name: torch.ones_like(module.weight, dtype=torch.bool) for name, module in layers.items()})
        return {"method": "lottery_ticket", "target_sparsity": 0.0, "rounds": 0, "scope": args.mask_scope,
                "patterns": list(patterns)}
    rounds = args.lottery_ticket_rounds or rounds_for_sparsity(args.sparsity)
    round_steps = max(1, math.ceil(args.lottery_ticket_round_fraction * total_steps))
    rewind_step = args.lottery_ticket_rewind_step
    if rewind_step > round_steps:
        raise ValueError(
            f"`lottery_ticket_rewind_step` ({rewind_step}) exceeds the optimizer steps of an IMP round "
            f"({round_steps} = lottery_ticket_round_fraction x {total_steps}); lower it or raise the fraction."
        )
    keep_columns = getattr(train_dataset, "format", {}).get("type") == "custom"
    rounds_trained = [0]

    def train_round(snapshot_step: int | None = None) -> dict[str, torch.Tensor] | None:
        snapshot = _Snapshot(snapshot_step)
        # Each round is logged once, labelled, by `iterative_magnitude_pruning`: the inner Trainer's own banners
        # ("Running training", at INFO) would be unlabelled repeats of the run's.
        with transformers_verbosity_at_least(logging.WARNING):
            round_args = round_arguments(args, round_steps, total_steps, rounds_trained[0], keep_columns)
            trainer = Trainer(model=model, args=round_args, train_dataset=train_dataset, data_collator=data_collator,
                              callbacks=[MaskCallback(), snapshot])
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        trainer.accelerator.free_memory()  # the round's optimizer state and DDP wrapper go with it
        del trainer
        rounds_trained[0] += 1
        return snapshot.state_dict

    if is_main_process:
        logger.info("Lottery ticket: %d IMP rounds of %d optimizer steps to sparsity %g, rewinding to %s.", rounds,
                    round_steps, args.sparsity, f"step {rewind_step}" if rewind_step > 0 else "initialisation")
    rewind_state = train_round(snapshot_step=rewind_step) if rewind_step > 0 else None
    first_round_done = [rewind_state is not None]  # trained above, on the way to the rewind snapshot

    def train_fn(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        if first_round_done[0]:
            first_round_done[0] = False
            return
        train_round()

    handle = iterative_magnitude_pruning(
        model,
        train_fn,
        rounds,
        prune_fraction_per_round=1.0 - (1.0 - args.sparsity) ** (1.0 / rounds),
        rewind="step" if rewind_state is not None else "init",
        rewind_state=rewind_state,
        scope=args.mask_scope,
        patterns=patterns,
    )
    metadata = dict(handle.metadata)
    metadata.update(target_sparsity=args.sparsity, round_steps=round_steps, rewind_step=rewind_step)
    return metadata


# --- the same masks and weights on every rank -----------------------------------------------------------------------


def sync_masks(model: nn.Module, accelerator) -> bool:
    """Give every rank rank 0's masks; return whether they all had exactly them already (True on one process)."""
    if accelerator.num_processes <= 1:
        return True
    mismatches = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for mask in get_masks(model).values():
        received = broadcast(mask.to(torch.uint8), from_process=0).bool()  # gloo has no bool broadcast
        mismatches += (received != mask).sum()
        mask.copy_(received)
    reapply(model)
    mismatches = int(accelerator.reduce(mismatches, reduction="sum"))
    if mismatches and accelerator.is_main_process:
        logger.warning("Masks differed across ranks in %d entries (non-deterministic scores?); rank 0's are used.",
                       mismatches)
    return mismatches == 0


@torch.no_grad()
def broadcast_parameters(model: nn.Module, accelerator) -> None:
    """Rank 0's parameters and buffers on every rank (the rescaled initialisation may differ in the last bits)."""
    if accelerator.num_processes <= 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype == torch.bool:
            tensor.copy_(broadcast(tensor.to(torch.uint8), from_process=0).bool())
        else:
            broadcast(tensor.data, from_process=0)


# --- layer-wise rescaled initialisation -----------------------------------------------------------------------------


def rescale_initialisation(
    model: nn.Module, args: ToSTTrainingArguments, batches: Iterable[Any], total_steps: int
) -> tuple[GradInitReport | None, dict[str, Any]]:
    """GradInit with a masked look-ahead, 1/sqrt(density), or nothing (`args.rescaled_init`); pruned weights stay
    zero. Returns the GradInit report (or None) and what was done."""
    done: dict[str, Any] = {"rescaled_init": args.rescaled_init}
    report = None
    if args.rescaled_init == "gradinit":
        steps = args.rescaled_init_steps
        steps = default_rescaled_init_steps(total_steps) if steps is None else steps
        done["rescaled_init_steps"] = steps
        if steps > 0:
            model.train()
            report = gradinit_rescale(
                model, batches, loss_fn=default_loss_fn, steps=steps, lr=args.gradinit_lr, eta=args.gradinit_eta,
                gamma=args.gradinit_gamma, min_scale=args.gradinit_min_scale,
            )
            done.update(gradinit_loss_before=report.loss_before, gradinit_loss_after=report.loss_after)
    elif args.rescaled_init == "density":
        factors = density_rescale(model)
        logger.info("Rescaled init: %d masked weights scaled by 1/sqrt(density), factors %.3f to %.3f.", len(factors),
                    min(factors.values(), default=1.0), max(factors.values(), default=1.0))
    reapply(model)
    return report, done
