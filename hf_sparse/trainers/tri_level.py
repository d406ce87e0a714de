"""Tri-Level E-ViT training: example pruning (level 1) with scheduled token (level 2) and attention (level 3)
sparsity, as a `TrainingArguments` dataclass paired with a `Trainer` subclass.

What differs from the reference code, on purpose:
  * the active example set is global: per-sample statistics are gathered across ranks, so every rank holds the same
    set and draws the same order (seed + epoch); the savings are real optimizer steps not taken (every epoch has
    the planned, smaller size, so the learning-rate schedule and the progress bar count only what is trained);
  * statistics are recorded vectorised inside the training step, with no per-sample host sync;
  * correctness is judged on the inputs the model was trained on, against their own labels;
  * ties in forgetting counts are broken by CLS-attention variance (or a seeded permutation), never by index.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from ..data.example_pruning import ExamplePruner, ExamplePruningSampler, build_example_pruner, plan_refresh_epochs
from ..flops import token_counts
from ..hub import TrainingReport, write_save_extras
from ..validation import check_choice, check_fraction
from .checkpoints import resolve_resume_checkpoint


EXAMPLE_PRUNING_METHODS = ("forgetting", "infobatch", "random", "none")
TIE_BREAKS = ("cls_attention_variance", "random")
EXAMPLE_INDEX = "example_index"


@dataclass
class TriLevelTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the three levels of Tri-Level E-ViT. Defaults follow the paper where it has one."""

    example_pruning: str = field(
        default="forgetting",
        metadata={"help": f"Example-level pruning: one of {EXAMPLE_PRUNING_METHODS}.", "choices": EXAMPLE_PRUNING_METHODS},
    )
    example_inactive_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of the training set left out of every epoch (paper: 0.2)."}
    )
    example_refresh_fraction: float = field(
        default=0.1, metadata={"help": "Forgetting: re-score and swap examples every this fraction of the epochs."}
    )
    example_last_refresh_fraction: float = field(
        default=0.5, metadata={"help": "Forgetting: no refresh after this fraction of the epochs (paper: half)."}
    )
    example_swap_fraction: float = field(
        default=0.05, metadata={"help": "Forgetting: fraction of the data swapped at each refresh (paper: 0.05)."}
    )
    example_tie_break: str = field(
        default="cls_attention_variance",
        metadata={"help": f"Forgetting ties broken by: one of {TIE_BREAKS}.", "choices": TIE_BREAKS},
    )
    infobatch_prune_ratio: float = field(
        default=0.5, metadata={"help": "InfoBatch: fraction of the low-loss pool dropped each epoch (InfoBatch: 0.5)."}
    )
    infobatch_tail_fraction: float = field(
        default=0.125, metadata={"help": "InfoBatch: final fraction of the epochs trained without loss-based pruning."}
    )
    token_keep_ratio: float = field(
        default=1.0, metadata={"help": "Final fraction of patch tokens kept at each pruning layer (1.0: off)."}
    )
    attention_keep_ratio: float = field(
        default=1.0, metadata={"help": "Final fraction of patch keys kept per patch query (1.0: off)."}
    )
    sparsity_warmup_fraction: float = field(
        default=10 / 300, metadata={"help": "Fraction of training with dense tokens/attention (paper: 10/300)."}
    )
    sparsity_decay_fraction: float = field(
        default=100 / 300, metadata={"help": "Fraction of training over which ratios go from 1 to final by cosine."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("example_pruning", self.example_pruning, EXAMPLE_PRUNING_METHODS)
        check_choice("example_tie_break", self.example_tie_break, TIE_BREAKS)
        check_fraction(
            "example_inactive_fraction", self.example_inactive_fraction, low_inclusive=True, high_inclusive=False
        )
        if self.example_pruning == "none" and self.example_inactive_fraction != 0.0:
            self.example_inactive_fraction = 0.0  # nothing is left out without example pruning
        if self.example_pruning != "none" and self.example_inactive_fraction == 0.0:
            raise ValueError(
                f"`example_inactive_fraction` must be > 0 with `example_pruning`={self.example_pruning!r} "
                "(or set `example_pruning='none'`)."
            )
        check_fraction(
            "example_refresh_fraction", self.example_refresh_fraction, low_inclusive=False, high_inclusive=True
        )
        check_fraction(
            "example_last_refresh_fraction", self.example_last_refresh_fraction, low_inclusive=True, high_inclusive=True
        )
        check_fraction("example_swap_fraction", self.example_swap_fraction, low_inclusive=True, high_inclusive=False)
        check_fraction("infobatch_prune_ratio", self.infobatch_prune_ratio, low_inclusive=False, high_inclusive=False)
        check_fraction(
            "infobatch_tail_fraction", self.infobatch_tail_fraction, low_inclusive=True, high_inclusive=False
        )
        check_fraction("token_keep_ratio", self.token_keep_ratio, low_inclusive=False, high_inclusive=True)
        check_fraction("attention_keep_ratio", self.attention_keep_ratio, low_inclusive=False, high_inclusive=True)
        check_fraction(
            "sparsity_warmup_fraction", self.sparsity_warmup_fraction, low_inclusive=True, high_inclusive=False
        )
        check_fraction("sparsity_decay_fraction", self.sparsity_decay_fraction, low_inclusive=True, high_inclusive=True)
        if self.sparsity_warmup_fraction + self.sparsity_decay_fraction > 1.0:
            raise ValueError(
                "`sparsity_warmup_fraction` + `sparsity_decay_fraction` must be <= 1, got "
                f"{self.sparsity_warmup_fraction} + {self.sparsity_decay_fraction}."
            )

    def scheduled_ratios(self, progress: float) -> tuple[float, float]:
        """(token, attention) keep ratios at `progress` in [0, 1] of training: 1 during warm-up, then a cosine to the
        final ratios over the decay fraction, then the final ratios."""
        warmup, decay = self.sparsity_warmup_fraction, self.sparsity_decay_fraction
        if progress < warmup:
            weight = 1.0
        elif decay > 0 and progress < warmup + decay:
            weight = 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / decay))
        else:
            weight = 0.0
        return (
            self.token_keep_ratio + (1.0 - self.token_keep_ratio) * weight,
            self.attention_keep_ratio + (1.0 - self.attention_keep_ratio) * weight,
        )


class IndexedDataset(Dataset):
    """Adds each example's position in the training set, so statistics can be recorded per example."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item[EXAMPLE_INDEX] = index
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # Batched fetch, so a `with_transform` data set transforms a whole batch at once (as without the wrapper).
        if hasattr(self.dataset, "__getitems__"):
            items = [dict(item) for item in self.dataset.__getitems__(indices)]
        else:
            items = [dict(self.dataset[index]) for index in indices]
        for item, index in zip(items, indices):
            item[EXAMPLE_INDEX] = index
        return items


class TriLevelTrainer(Trainer):
    """A `Trainer` that trains on a pruned, refreshed subset of the examples and schedules token and attention
    sparsity. Construct it like `Trainer`, with `TriLevelTrainingArguments`.

    The example level works with any model that returns logits. Token and attention sparsity need a model with
    `set_sparsity` (e.g. `SparseViTForImageClassification`, or one converted with `.from_vit`).
    """

    _tag_names = ["hf_sparse", "tri-level-evit"]

    def __init__(self, model=None, args: TriLevelTrainingArguments | None = None, train_dataset=None, **kwargs):
        if args is None or not isinstance(args, TriLevelTrainingArguments):
            raise ValueError("TriLevelTrainer needs `args` of type TriLevelTrainingArguments.")
        if train_dataset is not None:
            train_dataset = IndexedDataset(train_dataset)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._supports_sparsity = hasattr(unwrapped, "set_sparsity")
        if not self._supports_sparsity and (args.token_keep_ratio < 1.0 or args.attention_keep_ratio < 1.0):
            raise ValueError(
                f"`token_keep_ratio`/`attention_keep_ratio` below 1.0 need a model with token and attention sparsity; "
                f"{type(unwrapped).__name__} has none. Convert it with "
                "`SparseViTForImageClassification.from_vit(model)`, or set both ratios to 1.0 (example pruning alone "
                "works with any classifier)."
            )
        if self._supports_sparsity:
            # The final ratios are the model's own: saved with it and used for evaluation, as in the paper.
            unwrapped.config.token_keep_ratio = args.token_keep_ratio
            unwrapped.config.attention_keep_ratio = args.attention_keep_ratio
            unwrapped.reset_sparsity()
        forward_parameters = inspect.signature(unwrapped.forward).parameters
        self._records_cls_variance = "output_cls_attention_variance" in forward_parameters
        self.example_pruner: ExamplePruner | None = None
        self._resume_pruning_from: str | None = None
        self._samples_seen = 0
        self._samples_since_log = 0
        self._last_log_time: float | None = None
        self._train_start_time: float | None = None

    @property
    def samples_seen(self) -> int:
        """Examples trained so far, over all ranks."""
        return self._samples_seen

    # --- data: the pruned, globally identical epoch order ---------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if EXAMPLE_INDEX not in self._signature_columns:
            self._signature_columns.append(EXAMPLE_INDEX)

    def _remove_unused_columns(self, dataset, description=None):
        # A `with_transform` data set needs its raw columns (the image) until the transform has run.
        if getattr(dataset, "format", {}).get("type") == "custom":
            return dataset
        return super()._remove_unused_columns(dataset, description)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self.example_pruner = self._build_example_pruner(len(dataset))
        if self._resume_pruning_from is not None:
            self.example_pruner.load(self._resume_pruning_from)
        return ExamplePruningSampler(self.example_pruner)

    def _build_example_pruner(self, num_examples: int) -> ExamplePruner:
        args = self.args
        num_epochs = self._planned_epochs(num_examples)
        fields = {}
        if args.example_pruning == "forgetting":
            fields = {
                "refresh_epochs": plan_refresh_epochs(
                    num_epochs, args.example_refresh_fraction, args.example_last_refresh_fraction
                ),
                "swap_fraction": args.example_swap_fraction,
                "tie_break": args.example_tie_break,
            }
        elif args.example_pruning == "infobatch":
            fields = {"prune_ratio": args.infobatch_prune_ratio, "tail_fraction": args.infobatch_tail_fraction}
        return build_example_pruner(
            args.example_pruning,
            num_examples,
            num_epochs=num_epochs,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            inactive_fraction=args.example_inactive_fraction,
            **fields,
        )

    def _planned_epochs(self, num_examples: int) -> int:
        if self.args.max_steps <= 0:
            return max(1, math.ceil(self.args.num_train_epochs))
        epoch_size = num_examples - round(self.args.example_inactive_fraction * num_examples)
        global_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        global_batch *= max(1, self.args.world_size)
        return max(1, math.ceil(self.args.max_steps * global_batch / max(1, epoch_size)))

    # --- training step: schedule, loss, statistics --------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._supports_sparsity:
            progress = self.state.global_step / max(1, self.state.max_steps)
            token_ratio, attention_ratio = self.args.scheduled_ratios(progress)
            self.accelerator.unwrap_model(model).set_sparsity(token_ratio, attention_ratio)
        if self._train_start_time is None:
            self._train_start_time = self._last_log_time = time.perf_counter()
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        example_index = inputs.pop(EXAMPLE_INDEX, None)
        if example_index is None or not model.training or self.example_pruner is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        extra = {}
        if self._records_cls_variance and self.args.example_tie_break == "cls_attention_variance":
            extra["output_cls_attention_variance"] = True
        outputs = model(**inputs, **extra)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        per_example = F.cross_entropy(
            logits.float(), labels, reduction="none", label_smoothing=self.args.label_smoothing_factor
        )
        weights = self.example_pruner.loss_weights(example_index.cpu()).to(per_example.device)
        # A per-batch mean: the Trainer divides it by the accumulation steps (SparseViT sets accepts_loss_kwargs=False).
        loss = (per_example * weights).mean()
        self._record(example_index, logits, labels, per_example, getattr(outputs, "cls_attention_variance", None))
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, example_index, logits, labels, per_example_loss, cls_variance) -> None:
        """Gather this step's statistics from every rank, so all ranks update the same global state."""
        correct = logits.argmax(dim=-1) == labels
        if cls_variance is None:
            cls_variance = torch.full_like(per_example_loss, float("nan"))
        statistics = torch.stack((correct.float(), per_example_loss.detach().float(), cls_variance.float()), dim=1)
        indices = self.accelerator.gather(example_index.long()).cpu()
        statistics = self.accelerator.gather(statistics).cpu()
        variance = statistics[:, 2]
        self.example_pruner.record(
            indices, statistics[:, 0].bool(), statistics[:, 1], None if torch.isnan(variance).all() else variance
        )
        self._samples_seen += indices.shape[0]
        self._samples_since_log += indices.shape[0]

    # --- evaluation uses the final ratios -------------------------------------------------------------------------

    def evaluate(self, *args, **kwargs):
        if self._supports_sparsity:
            self.accelerator.unwrap_model(self.model).reset_sparsity()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        if self._supports_sparsity:
            self.accelerator.unwrap_model(self.model).reset_sparsity()
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
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self._supports_sparsity:
                sparsity = unwrapped.get_sparsity()
                logs.update({k: round(v, 4) for k, v in sparsity.items()})
                counts = token_counts(unwrapped.config, sparsity["token_keep_ratio"])
                logs["tokens_per_image"] = round(sum(attn for attn, _ in counts) / len(counts), 2)
        super().log(logs, *args, **kwargs)

    # --- checkpoints: the example-pruning state travels with every checkpoint ---------------------------------------

    def training_report(self) -> TrainingReport:
        """The card's account of this run; fields a caller already set on `model.hf_sparse_report` (data set, dense
        baseline time) are kept."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        report = getattr(unwrapped, "hf_sparse_report", None) or TrainingReport()
        report.method = "tri_level"
        accuracies = [entry["eval_accuracy"] for entry in self.state.log_history if "eval_accuracy" in entry]
        if accuracies:
            report.test_accuracy = accuracies[-1]
        if self._train_start_time is not None and self._last_log_time is not None:
            report.train_seconds = report.train_seconds or round(self._last_log_time - self._train_start_time, 2)
        report.images_trained = self._samples_seen or report.images_trained
        args = self.args
        report.settings.update(
            {
                "example_pruning": args.example_pruning,
                "example_inactive_fraction": args.example_inactive_fraction,
                "token/attention schedule": (
                    f"dense for {args.sparsity_warmup_fraction:.3g} of training, cosine to the final ratios over "
                    f"{args.sparsity_decay_fraction:.3g}"
                ),
            }
        )
        unwrapped.hf_sparse_report = report
        return report

    def create_model_card(self, *args, **kwargs) -> None:
        """Our card (sparsity settings, measured results) instead of the Trainer's generic one."""
        if not self.is_world_process_zero():
            return
        self.training_report()
        write_save_extras(self.accelerator.unwrap_model(self.model), self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._supports_sparsity:
            self.training_report()
        super().save_model(output_dir, _internal_call)
        if self.example_pruner is not None and self.args.should_save:
            self.example_pruner.save(output_dir or self.args.output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._resume_pruning_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)
