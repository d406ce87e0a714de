"""`TriLevelTrainer`: example pruning (level 1) with scheduled token (level 2) and attention (level 3) sparsity.

What differs from the reference code, on purpose:
  * the active example set is global: per-sample statistics are gathered across ranks, so every rank holds the same
    set and draws the same order (seed + epoch); the savings are real optimizer steps not taken (every epoch has
    the planned, smaller size, so the learning-rate schedule and the progress bar count only what is trained);
  * InfoBatch's epochs (`example_pruning="infobatch"`) vary in size with the losses: each epoch is planned when it
    begins, once every loss of the one before is in, and the Trainer runs exactly its steps (`_run_epoch`); the
    planned total (`state.max_steps`) is the steps run so far plus the epochs to come, each expected as large as the
    current one (the full data for the last, unpruned epochs), exact from the last pruned epoch on; the learning
    rate follows the run's progress in epochs, as upstream's schedule rebuilt every epoch does, so it reaches its
    final value (0 for linear decay) at the last step; a resumed run finds its place from the steps of each epoch
    (saved with the pruner's state);
  * statistics are computed vectorised on the device and reach the pruner without any host sync between forward and
    backward: the loss weights are indexed on the device, and the statistics are gathered across ranks after the
    backward has been queued and copied to the host without blocking (applied before the next epoch is planned and
    before every save);
  * correctness is judged on the inputs the model was trained on, against their own labels;
  * ties in forgetting counts are broken by CLS-attention variance (or a seeded permutation), never by index.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import ProgressCallback

from ..flops import token_counts
from ..logging_utils import get_logger
from ..trainers.base import SparseTrainer
from .arguments import TriLevelTrainingArguments
from .example_pruning import (
    EXAMPLE_INDEX,
    ExamplePruner,
    ExamplePruningSampler,
    IndexedDataset,
    InfoBatchExamplePruner,
    build_example_pruner,
    pack_statistics,
)
from .schedule import KeepRatioScheduleCallback

logger = get_logger(__name__)

RESUME_HINT = ("`method` is `example_pruning`; `num_examples` the training set's size; `epoch_size` follows from "
               "`example_inactive_fraction`; `seed` is `data_seed` (or `seed`).")


def epoch_position(step: int, steps_per_epoch: list[int]) -> tuple[int, int]:
    """(epoch, steps into it) of optimizer step ``step`` in a run whose epochs take ``steps_per_epoch`` steps; a step
    past the epochs listed is at the start of the next one."""
    start = 0
    for epoch, steps in enumerate(steps_per_epoch):
        if step < start + steps:
            return epoch, step - start
        start += steps
    return len(steps_per_epoch), step - start


def epoch_progress(step: int, steps_per_epoch: list[int], num_epochs: int) -> float:
    """The share of the run done at optimizer step ``step``, in epochs: step i of epoch e (of U_e steps) is at
    (e + i / U_e) / num_epochs, where upstream InfoBatch's per-epoch schedule puts it."""
    epoch, into = epoch_position(step, steps_per_epoch)
    if epoch < len(steps_per_epoch):
        return (epoch + into / steps_per_epoch[epoch]) / num_epochs
    return min(epoch, num_epochs) / num_epochs


class TriLevelTrainer(SparseTrainer):
    """A `Trainer` that trains on a pruned, refreshed subset of the examples and schedules token and attention
    sparsity. Construct it like `Trainer`, with `TriLevelTrainingArguments`.

    The example level works with any model that returns logits. Token and attention sparsity need a model with
    `set_sparsity` (e.g. `SparseViTForImageClassification`, or one converted with `.from_vit`); their final ratios
    are the model's own (`config.token_keep_ratio`, `config.attention_keep_ratio`), replaced by the arguments' when
    these are set.
    """

    arguments_class = TriLevelTrainingArguments
    method = "tri_level"
    _tag_names = ["hf_sparse", "tri-level-evit"]

    def __init__(self, model=None, args: TriLevelTrainingArguments | None = None, train_dataset=None, **kwargs):
        if train_dataset is not None:
            train_dataset = IndexedDataset(train_dataset)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        unwrapped = self.unwrapped_model
        self._supports_sparsity = hasattr(unwrapped, "set_sparsity")
        if self._supports_sparsity:
            self._apply_final_ratios(unwrapped.config)
            self.add_callback(KeepRatioScheduleCallback(args.keep_ratio_schedule))
        elif any(ratio is not None and ratio < 1.0 for ratio in (args.token_keep_ratio, args.attention_keep_ratio)):
            raise ValueError(
                f"`token_keep_ratio`/`attention_keep_ratio` below 1.0 need a model with token and attention sparsity; "
                f"{type(unwrapped).__name__} has none. Convert it with "
                "`SparseViTForImageClassification.from_vit(model)`, or set both ratios to 1.0 (example pruning alone "
                "works with any classifier)."
            )
        # Only forgetting's tie-break reads the CLS-attention variance: the other methods do not pay for it.
        self._records_cls_variance = (
            args.example_pruning == "forgetting" and args.example_tie_break == "cls_attention_variance"
            and "output_cls_attention_variance" in inspect.signature(unwrapped.forward).parameters
        )
        if args.example_pruning == "forgetting" and args.example_tie_break == "cls_attention_variance" and not (
                self._records_cls_variance):
            logger.warning("TriLevelTrainer: %s returns no CLS-attention variance; forgetting ties are broken at "
                           "random.", type(unwrapped).__name__)
        if self.compute_loss_func is not None and args.example_pruning != "none":
            logger.warning("TriLevelTrainer: with `compute_loss_func`, no per-example statistics are recorded, so "
                           "example pruning (%s) cannot score examples.", args.example_pruning)
        self.example_pruner: ExamplePruner | None = None
        # This step's per-example statistics, on the device: recorded after the backward (see training_step)
        self._unrecorded_statistics: list[tuple[torch.Tensor, bool]] = []
        self._resume_pruning_from: str | None = None
        self._full_epoch_steps = 0  # optimizer steps of an epoch of every example (set when training starts)
        self._samples_seen = 0
        self._samples_since_log = 0
        self._last_log_time: float | None = None
        self._train_start_time: float | None = None

    def _apply_final_ratios(self, config) -> None:
        """The final ratios are the model's own: an explicit argument replaces them, and says so once."""
        for name in ("token_keep_ratio", "attention_keep_ratio"):
            requested, own = getattr(self.args, name), getattr(config, name)
            if requested is not None and requested != own:
                logger.warning("TriLevelTrainer: `%s`=%g from the arguments replaces the model's config.%s=%g "
                               "(the model is saved with %g).", name, requested, name, own, requested)
                setattr(config, name, requested)
        self.unwrapped_model.reset_sparsity()

    @property
    def samples_seen(self) -> int:
        """Examples trained so far, over all ranks."""
        return self._samples_seen

    def images_trained(self) -> int | None:
        return self._samples_seen or None

    # --- data: the pruned, globally identical epoch order ---------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if EXAMPLE_INDEX not in self._signature_columns:
            self._signature_columns.append(EXAMPLE_INDEX)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        fields: dict[str, Any] = {"inactive_fraction": args.example_inactive_fraction}
        if args.example_pruning == "forgetting":
            fields.update(refresh_period_fraction=args.example_refresh_fraction,
                          refresh_last_fraction=args.example_last_refresh_fraction,
                          swap_fraction=args.example_swap_fraction, tie_break=args.example_tie_break)
        elif args.example_pruning == "infobatch":  # no inactive fraction: the losses set each epoch's size
            fields = {"prune_ratio": args.infobatch_prune_ratio, "delta": args.infobatch_delta}
        elif args.example_pruning == "infobatch_fixed_size":
            fields.update(prune_ratio=args.infobatch_prune_ratio, tail_fraction=args.infobatch_tail_fraction)
        self.example_pruner = build_example_pruner(
            args.example_pruning,
            len(dataset),
            num_epochs=None,  # planned in `set_initial_training_values`, from the Trainer's own count
            seed=args.data_seed if args.data_seed is not None else args.seed,
            **fields,
        )
        return ExamplePruningSampler(self.example_pruner)

    def num_examples(self, dataloader) -> int:
        # An epoch trains the active examples only (the Trainer's samples/s and sample counts follow).
        if self.example_pruner is not None and isinstance(getattr(dataloader, "dataset", None), IndexedDataset):
            return self.example_pruner.epoch_size
        return super().num_examples(dataloader)

    def set_initial_training_values(self, *args, **kwargs):
        values = super().set_initial_training_values(*args, **kwargs)
        self.example_pruner.plan_run(values[0])  # num_train_epochs, the Trainer's own count (transformers 5.x)
        # Before any state is loaded the pruner plans a full first epoch: the Trainer counted a full epoch's steps
        self._full_epoch_steps = values[1]
        if self._resume_pruning_from is not None:
            try:
                self.example_pruner.load(self._resume_pruning_from)
            except ValueError as error:
                raise ValueError(
                    f"Cannot resume from {self._resume_pruning_from}: its example-pruning state does not fit this run "
                    f"({error}). {RESUME_HINT} Resume with the arguments and data of the run that wrote it."
                ) from error
            self._samples_seen = self.example_pruner.samples_recorded
        return values

    def _prepare_training(self, resume_from_checkpoint: str | None) -> None:
        self._resume_pruning_from = resume_from_checkpoint

    # --- epochs whose size varies (InfoBatch): the Trainer runs each epoch's own steps --------------------------
    # `_init_training_state` and `_run_epoch` are the Trainer's (transformers 5.23 to 5.25 at least); both assume one
    # number of steps per epoch, which only these overrides replace.

    @property
    def _varying_epochs(self) -> InfoBatchExamplePruner | None:
        pruner = self.example_pruner
        return pruner if pruner is not None and not pruner.fixed_epoch_size else None

    def _init_training_state(self, *args, **kwargs) -> tuple[int, int]:
        epochs_trained, batches_trained = super()._init_training_state(*args, **kwargs)
        pruner = self._varying_epochs
        if pruner is not None and self.state.global_step > 0:  # resumed: find the place in epochs of their own sizes
            epochs_trained, steps_trained = epoch_position(self.state.global_step, pruner.optimizer_steps_per_epoch)
            batches_trained = 0 if self.args.ignore_data_skip else steps_trained * self.args.gradient_accumulation_steps
        return epochs_trained, batches_trained

    def _run_epoch(self, **kwargs) -> None:
        if self._varying_epochs is not None:
            kwargs.update(self._plan_varying_epoch(kwargs["epoch"], kwargs["train_dataloader"]))
        return super()._run_epoch(**kwargs)

    def _plan_varying_epoch(self, epoch: int, dataloader) -> dict[str, int]:
        """Plan ``epoch`` now (every loss of the epoch before is in: planning flushes the pruner's queue), count its
        batches and steps, and bring the run's planned total up to date."""
        pruner = self._varying_epochs
        pruner.epoch_indices(epoch)
        batches = len(dataloader)  # this epoch's, per process (accelerate shards the planned order)
        steps = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)
        pruner.note_optimizer_steps(epoch, steps)
        self.state.max_steps = self.planned_total_steps()
        for callback in self.callback_handler.callbacks:  # the progress bar was sized at the start of training
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None:
                bar.total = self.state.max_steps
                bar.refresh()
        return {"steps_in_epoch": batches, "num_update_steps_per_epoch": steps}

    def planned_total_steps(self) -> int:
        """Optimizer steps of the run as planned now: the epochs planned so far at their own steps, each epoch to come
        as large as the current one while it prunes, and as a full epoch once it trains everything. Exact from the
        last pruning epoch on; before the first epoch, a full epoch's steps times the number of epochs."""
        pruner = self._varying_epochs
        noted = pruner.optimizer_steps_per_epoch
        if not noted:
            return self._full_epoch_steps * pruner.num_epochs
        current = noted[-1]
        to_come = range(len(noted), pruner.num_epochs)
        return sum(noted) + sum(current if pruner.prunes(epoch) else self._full_epoch_steps for epoch in to_come)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and self._varying_epochs is not None:
            self._follow_epoch_progress(scheduler, num_training_steps)
        return scheduler

    def _follow_epoch_progress(self, scheduler, horizon: int) -> None:
        """Make a step-based schedule (of ``horizon`` steps, a full-data run's) follow the run's progress in epochs:
        at optimizer step s its factor is the one of step ``horizon * progress(s)`` (see `epoch_progress`)."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            logger.warning("TriLevelTrainer: %s is not step-based through LambdaLR; with InfoBatch's varying epochs "
                           "it counts optimizer steps, not the run's progress.", type(scheduler).__name__)
            return
        pruner = self._varying_epochs

        def at_progress(factor: Callable[[float], float]) -> Callable[[int], float]:
            # A plain function: LambdaLR's state_dict skips functions, so nothing of the trainer is saved with it.
            def follow(step: int) -> float:
                progress = epoch_progress(step, pruner.optimizer_steps_per_epoch, pruner.num_epochs)
                return factor(horizon * progress)

            return follow

        scheduler.lr_lambdas = [at_progress(factor) for factor in scheduler.lr_lambdas]

    # --- training step: loss and statistics -------------------------------------------------------------------

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.example_pruner is not None:
            self.example_pruner.flush()  # the last steps' statistics reach the pruner before anyone reads it
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._train_start_time is None:
            self._train_start_time = self._last_log_time = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The backward is queued: gathering and recording now does not hold it up (every micro-batch records).
        self._record_statistics()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        example_index = inputs.pop(EXAMPLE_INDEX, None)
        if (example_index is None or not model.training or self.example_pruner is None or "labels" not in inputs
                or self.compute_loss_func is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra = {"output_cls_attention_variance": True} if self._records_cls_variance else {}
        labels = inputs["labels"]
        per_example, outputs = self.classification_loss(model, inputs, **extra)
        # Indexed on the device: no host copy between this forward and its backward.
        weights = self.example_pruner.loss_weights(example_index).to(per_example.device)
        loss = (per_example * weights).mean()  # a per-batch mean (`loss_is_scaled_for_ga=False`)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        self._stash_statistics(example_index, logits, labels, per_example,
                               getattr(outputs, "cls_attention_variance", None))
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _stash_statistics(self, example_index, logits, labels, per_example_loss, cls_variance) -> None:
        """Keep this batch's statistics, packed on the device (`pack_statistics`: one tensor to gather across ranks),
        until the step's backward is queued (`_record_statistics`)."""
        correct = logits.argmax(dim=-1) == labels.to(logits.device)
        statistics = pack_statistics(example_index, correct, per_example_loss, cls_variance)
        self._unrecorded_statistics.append((statistics, cls_variance is not None))

    def _record_statistics(self) -> None:
        """Gather the stashed statistics from every rank (so all ranks update the same global state) and queue them
        for the pruner, still packed, without waiting for the device (`ExamplePruner.record_packed_async`)."""
        while self._unrecorded_statistics:
            statistics, has_variance = self._unrecorded_statistics.pop(0)
            statistics = self.accelerator.gather(statistics)
            self.example_pruner.record_packed_async(statistics, has_variance)
            self._samples_seen += statistics.shape[0]
            self._samples_since_log += statistics.shape[0]

    # --- evaluation uses the final ratios -------------------------------------------------------------------------

    def evaluate(self, *args, **kwargs):
        if self._supports_sparsity:
            self.unwrapped_model.reset_sparsity()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        if self._supports_sparsity:
            self.unwrapped_model.reset_sparsity()
        return super().predict(*args, **kwargs)

    # --- logging ------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.example_pruner is not None:
            now = time.perf_counter()
            logs["samples_seen"] = self._samples_seen
            logs["examples_active_fraction"] = self.example_pruner.epoch_size / self.example_pruner.num_examples
            if self._last_log_time is not None and now > self._last_log_time:
                logs["images_per_second"] = round(self._samples_since_log / (now - self._last_log_time), 2)
            if self._train_start_time is not None:
                logs["wall_clock_s"] = round(now - self._train_start_time, 2)
            self._samples_since_log, self._last_log_time = 0, now
            if self._supports_sparsity:
                unwrapped = self.unwrapped_model
                sparsity = unwrapped.get_sparsity()
                logs.update({k: round(v, 4) for k, v in sparsity.items()})
                counts = token_counts(unwrapped.config, sparsity["token_keep_ratio"],
                                      getattr(unwrapped.config, "patch_dropout_keep_ratio", 1.0))
                logs["tokens_per_image"] = round(sum(attn for attn, _ in counts) / len(counts), 2)
        super().log(logs, *args, **kwargs)

    # --- report and checkpoints: the example-pruning state travels with every checkpoint ------------------------

    def report_settings(self) -> dict[str, Any]:
        """The card's rows for what ran: example pruning (its fraction only when on) and the keep-ratio schedule
        only when the model prunes tokens or attention (its final ratios are rows of the card already)."""
        args, config = self.args, self.unwrapped_model.config
        settings: dict[str, Any] = {"example pruning": args.example_pruning}
        if args.example_pruning not in ("none", "infobatch"):
            settings["example inactive fraction"] = args.example_inactive_fraction
        if args.example_pruning == "infobatch":
            settings["InfoBatch prune ratio"] = args.infobatch_prune_ratio
            settings["InfoBatch delta (share of the epochs that prune)"] = args.infobatch_delta
        ratios = (getattr(config, "token_keep_ratio", 1.0), getattr(config, "attention_keep_ratio", 1.0))
        if min(ratios) < 1.0:
            settings["token/attention schedule"] = (
                f"dense for {args.sparsity_warmup_fraction:.3g} of training, cosine to the final ratios over "
                f"{args.sparsity_decay_fraction:.3g}"
            )
        return settings

    def save_method_state(self, directory: str) -> None:
        if self.example_pruner is not None:
            self.example_pruner.save(directory)
