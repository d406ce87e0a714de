"""What both hf_sparse trainers share: the argument type check, data checks, `with_transform` columns, resume
checks, the per-batch classification loss, and the training report and model card written with every save."""

from __future__ import annotations

import json
import os
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..hub import TrainingReport, write_model_card
from ..logging_utils import get_logger
from .checkpoints import resolve_resume_checkpoint
from .data_checks import LABEL_KEYS, check_classification_dataset

logger = get_logger(__name__)


class TrainingTimeCallback(TrainerCallback, ExportableState):
    """Training wall-clock summed over a run and the runs it resumed from: the seconds counted up to a checkpoint are
    saved in its `trainer_state.json` (`stateful_callbacks`) and read back when training resumes from it."""

    def __init__(self, seconds_before_resume: float = 0.0):
        self.seconds_before_resume = seconds_before_resume
        self._start: float | None = None
        self._end: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._end = time.perf_counter(), None

    def on_train_end(self, args, state, control, **kwargs):
        self._end = time.perf_counter()

    @property
    def started(self) -> bool:
        return self._start is not None

    @property
    def seconds(self) -> float:
        """Seconds of training so far (up to the end of `train()`), the resumed-from runs' included."""
        if self._start is None:
            return self.seconds_before_resume
        return self.seconds_before_resume + (self._end or time.perf_counter()) - self._start

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"seconds_before_resume": self.seconds}}

    @classmethod
    def seconds_in_checkpoint(cls, checkpoint: str) -> float:
        """The seconds a checkpoint's run had trained when it was written (0 for checkpoints without them)."""
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            stored = json.load(handle).get("stateful_callbacks", {}).get(cls.__name__, {})
        return float(stored.get("attributes", {}).get("seconds_before_resume", 0.0))


class SparseTrainer(Trainer):
    """Base of `TriLevelTrainer` and `ToSTTrainer` (not meant to be used on its own).

    Subclasses set `arguments_class`, `method` (the report's method) and `_tag_names`, and override
    `_prepare_training` (called by `train` with the checkpoint to resume from, or None), `per_example_loss` and
    `report_settings`.
    """

    arguments_class: ClassVar[type[TrainingArguments]] = TrainingArguments
    method: ClassVar[str] = "dense"
    _tag_names: ClassVar[list[str]] = ["hf_sparse"]
    # Our training loss is a per-batch mean: the Trainer divides it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args: TrainingArguments | None = None, **kwargs):
        if not isinstance(args, self.arguments_class):
            raise ValueError(f"{type(self).__name__} needs `args` of type {self.arguments_class.__name__}.")
        if kwargs.get("model_init") is not None:
            raise ValueError(
                f"{type(self).__name__} does not support `model_init`: its techniques are set up on the model given "
                "as `model`."
            )
        super().__init__(model=model, args=args, **kwargs)
        # The model's own loss is a per-batch mean as well (`loss_is_scaled_for_ga` holds for every path).
        self.model_accepts_loss_kwargs = False
        self.add_callback(TrainingTimeCallback())
        self._set_problem_type()

    def _set_problem_type(self) -> None:
        """Fix the model's `config.problem_type` before the first forward, by transformers' rule (one label: regression;
        integer labels: single-label; otherwise multi-label) applied to the first example. Models infer it lazily in
        `forward`, which under `torch.compile` changes a guarded value and costs one more graph."""
        config = getattr(self.unwrapped_model, "config", None)
        if getattr(config, "problem_type", "") is not None or not isinstance(getattr(config, "num_labels", None), int):
            return
        if config.num_labels == 1:
            config.problem_type = "regression"
            return
        try:
            example = (self.train_dataset if self.train_dataset is not None else self.eval_dataset)[0]
            label = torch.as_tensor(next(example[key] for key in LABEL_KEYS if key in example))
        except Exception:  # noqa: BLE001 - no readable label: the model infers it on first use, as before
            return
        single_label = not label.is_floating_point() and label.dtype != torch.bool
        config.problem_type = "single_label_classification" if single_label else "multi_label_classification"

    @property
    def training_clock(self) -> TrainingTimeCallback:
        # looked up each time: `restore_callback_states_from_checkpoint` replaces the instance on resume
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, TrainingTimeCallback))

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # --- data ----------------------------------------------------------------------------------------------------

    def _remove_unused_columns(self, dataset, description=None):
        # A `with_transform` data set needs its raw columns (the image) until the transform has run.
        if getattr(dataset, "format", {}).get("type") == "custom":
            return dataset
        return super()._remove_unused_columns(dataset, description)

    # --- training ------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, after checking the data against the model and the checkpoint (a broken one is named; with
        `True`, the newest whole checkpoint is used)."""
        if self.train_dataset is not None:
            check_classification_dataset(self.train_dataset, self.unwrapped_model, "train_dataset")
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            self.training_clock.seconds_before_resume = TrainingTimeCallback.seconds_in_checkpoint(resume_from_checkpoint)
        self._prepare_training(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _prepare_training(self, resume_from_checkpoint: str | None) -> None:
        """Set up the method's state before the training loop starts (resuming: from `resume_from_checkpoint`)."""

    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per example, in float32 (with `label_smoothing_factor`, HF's convention)."""
        return F.cross_entropy(
            logits.float(), labels, reduction="none", label_smoothing=self.args.label_smoothing_factor
        )

    def classification_loss(self, model, inputs: dict[str, Any], **forward_kwargs) -> tuple[torch.Tensor, Any]:
        """(per-example loss, outputs) of a classifier on `inputs` (which must hold `labels`)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if labels.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} trains single-label classifiers: `labels` must hold class indices, got "
                f"{labels.dtype}."
            )
        outputs = model(**inputs, **forward_kwargs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return self.per_example_loss(logits, labels.to(logits.device)), outputs

    # --- report and model card -----------------------------------------------------------------------------------

    def report_settings(self) -> dict[str, Any]:
        """The method's settings shown in the model card."""
        return {}

    def training_report(self, **fields: Any) -> TrainingReport:
        """The card's account of this run (method, last evaluation accuracy, training time, images, settings);
        `fields` set the rest (`dataset`, `base_model`, `dense_train_seconds`)."""
        history = self.state.log_history
        accuracies = [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry]
        runtimes = [entry["train_runtime"] for entry in history if "train_runtime" in entry]
        clock = self.training_clock  # counts across resumes; `train_runtime` only this `train()` call's
        train_seconds = clock.seconds if clock.started else (runtimes[-1] if runtimes else None)
        report = TrainingReport(
            method=self.method,
            test_accuracy=accuracies[-1] if accuracies else None,
            train_seconds=train_seconds,
            images_trained=self.images_trained(),
            settings=self.report_settings(),
        )
        for name, value in fields.items():
            if value is not None:
                setattr(report, name, value)
        return report

    def images_trained(self) -> int | None:
        """Training examples seen so far (None when the method does not count them)."""
        return None

    def _hub_repo_id(self) -> str | None:
        return getattr(self, "hub_model_id", None) or self.args.hub_model_id

    def write_model_card(self, directory: str, **report_fields: Any) -> None:
        """Write `hf_sparse_report.json` and the model card (README.md) into `directory`; a failure is logged, never
        raised, so it never costs the weights or the checkpoint."""
        try:
            write_model_card(
                self.unwrapped_model, directory, self.training_report(**report_fields), repo_id=self._hub_repo_id()
            )
        except Exception as error:  # noqa: BLE001 - the card is a side artefact
            logger.warning("Could not write the model card into %s (%s: %s); the weights are saved.",
                           directory, type(error).__name__, error)

    def create_model_card(self, model_name: str | None = None, dataset: str | None = None,
                          finetuned_from: str | None = None, **kwargs) -> None:
        """Our card (method settings, measured results, how to load) instead of the Trainer's generic one; called by
        `push_to_hub`, whose keyword arguments (`dataset=`, `finetuned_from=`) arrive here."""
        if not self.is_world_process_zero():
            return
        self.write_model_card(self.args.output_dir, dataset=dataset, base_model=finetuned_from)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the method's state and the model card (every checkpoint calls it)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            directory = output_dir or self.args.output_dir
            os.makedirs(directory, exist_ok=True)
            self.save_method_state(directory)
            self.write_model_card(directory)

    def save_method_state(self, directory: str) -> None:
        """Write what resuming the method needs beside the weights (example-pruning state, masks)."""
