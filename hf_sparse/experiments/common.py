"""What the recipes, the main job and the benchmarks share: argument dataclasses, data, models, metrics, timing.

`hf-sparse train` (`experiments/train.py`, under the thin `recipes/*.py`) parses a YAML config into these dataclasses
(transformers' `HfArgumentParser`) and calls the functions below, so a recipe run, `hf-sparse demo` and the benchmarks
build models and data the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from transformers import (
    HfArgumentParser,
    ResNetConfig,
    ResNetForImageClassification,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_image_transforms, image_processor_for
from ..data import load_image_classification_dataset
from ..logging_utils import get_logger
from ..models.sparse_vit import SparseViTForImageClassification
from ..models.sparse_vit.convert_vit import local_folder  # a missing folder is said to be one, not a bad Hub id
from ..validation import check_choice, check_fraction, check_int

logger = get_logger(__name__)


MODEL_TYPES = ("sparse_vit", "resnet")
HELD_OUT_SPLIT = "test"  # the one evaluation split that may be made from train where the data has none


@dataclass
class ModelArguments:
    """The model to train: a SparseViT from scratch (default) or converted from a ViT/DeiT checkpoint, or
    transformers' `ResNetForImageClassification` (for ToST, whose paper is about CNNs)."""

    model_type: str = field(
        default="sparse_vit", metadata={"help": "The model family.", "choices": list(MODEL_TYPES)}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "ViT/DeiT image-classification checkpoint (local folder or Hub id) to convert; default: "
                  "a model from scratch."},
    )
    hidden_size: int = field(default=96, metadata={"help": "Width of a model from scratch."})
    num_hidden_layers: int = field(default=6, metadata={"help": "Depth of a model from scratch."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads of a model from scratch."})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width (default: 4 x hidden_size)."})
    patch_size: int = field(default=4, metadata={"help": "Patch size of a model from scratch."})
    layer_norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon of a model from scratch."})
    token_pruning_layers: list[int] | None = field(
        default=None, metadata={"help": "0-based layer indices that prune tokens (default: 1/4, 2/4, 3/4 of depth)."}
    )
    token_fusion: bool = field(default=False, metadata={"help": "Fuse the dropped tokens into one (EViT)."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel.", "choices": ["sdpa", "eager"]}
    )
    resnet_hidden_sizes: list[int] = field(
        default_factory=lambda: [16, 32, 64], metadata={"help": "ResNet: the width of each stage."}
    )
    resnet_depths: list[int] = field(
        default_factory=lambda: [2, 2, 2], metadata={"help": "ResNet: basic blocks per stage."}
    )

    def __post_init__(self):
        check_choice("model_type", self.model_type, MODEL_TYPES)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size"):
            check_int(name, getattr(self, name), minimum=1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"`hidden_size`={self.hidden_size} must be a multiple of `num_attention_heads`="
                             f"{self.num_attention_heads}.")


@dataclass
class DataArguments:
    """An image-classification data set: the built-in Fashion-MNIST or anything `datasets.load_dataset` reads."""

    dataset_name: str = field(
        default="fashion_mnist", metadata={"help": "'fashion_mnist' (built in), a Hub name or a local image folder."}
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="test", metadata={"help": "Evaluation split."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: found by type)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: found by type)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize to this size (default: the data's)."})
    num_channels: int | None = field(default=None, metadata={"help": "1 or 3 (default: 1 for Fashion-MNIST, else 3)."})
    image_mean: list[float] | None = field(default=None, metadata={"help": "Per-channel means (default: per data set)."})
    image_std: list[float] | None = field(default=None, metadata={"help": "Per-channel stds (default: per data set)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first examples only."})
    held_out_fraction: float = field(
        default=0.1, metadata={"help": "Without an eval split (e.g. a flat image folder): the seeded, stratified "
                               "fraction of train held out for evaluation."}
    )
    random_crop_padding: int = field(default=0, metadata={"help": "Random-crop augmentation padding (pixels)."})
    horizontal_flip: bool = field(default=False, metadata={"help": "Random horizontal flips in training."})

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_fraction("held_out_fraction", self.held_out_fraction, low_inclusive=False)


@dataclass
class PreparedData:
    train: Any
    eval: Any
    label_names: list[str]
    image_size: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "fashion_mnist"

    def image_processor(self):
        return image_processor_for(self.image_size, self.num_channels, self.mean, self.std)


def load_splits(data_args: DataArguments, seed: int = 0, eval_split_flag: str = "eval_split") -> tuple[Any, Any]:
    """(train, eval) splits. Only the default evaluation split, "test", falls back to a seeded stratified
    `held_out_fraction` of train (logged) where the data has none; any other missing split is an error listing the
    splits (a misspelt split is never silently replaced). `eval_split_flag` names the option in that error."""
    name = data_args.dataset_name
    if name.replace("-", "_") != "fashion_mnist":
        name = local_folder(name) or name  # a missing folder is said to be one, not a data set `datasets` lacks
    splits = load_image_classification_dataset(name, None, data_args.image_column, data_args.label_column)
    if data_args.train_split not in splits:
        raise ValueError(f"`train_split`={data_args.train_split!r} is not a split of {data_args.dataset_name!r}; it "
                         f"has {sorted(splits)}.")
    if data_args.eval_split not in splits and data_args.eval_split != HELD_OUT_SPLIT:
        held_out = "" if HELD_OUT_SPLIT in splits else f" (or {HELD_OUT_SPLIT!r}: a held-out part of train)"
        raise ValueError(f"`{eval_split_flag}`={data_args.eval_split!r} is not a split of {data_args.dataset_name!r}; "
                         f"it has {sorted(splits)}{held_out}.")
    train = splits[data_args.train_split]
    if data_args.eval_split in splits:
        return train, splits[data_args.eval_split]
    parts = train.train_test_split(test_size=data_args.held_out_fraction, seed=seed, stratify_by_column="label")
    logger.warning("%s has no %r split (splits: %s): evaluating on %d examples (%g) held out of %r with seed %d.",
                   data_args.dataset_name, data_args.eval_split, sorted(splits), len(parts["test"]),
                   data_args.held_out_fraction, data_args.train_split, seed)
    return parts["train"], parts["test"]


def prepare_data(data_args: DataArguments, seed: int = 0) -> PreparedData:
    """Load, subset and transform (`with_transform`) the training and evaluation splits."""
    train, evaluation = load_splits(data_args, seed)
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    builtin = data_args.dataset_name.replace("-", "_") == "fashion_mnist"
    num_channels = data_args.num_channels or (1 if builtin else 3)
    image_size = data_args.image_size or train[0]["image"].size[0]
    mean = tuple(data_args.image_mean or (FASHION_MNIST_MEAN if builtin else (0.5,) * num_channels))
    std = tuple(data_args.image_std or (FASHION_MNIST_STD if builtin else (0.5,) * num_channels))
    train_transform = build_image_transforms(
        image_size, num_channels, mean, std, train=True,
        random_crop_padding=data_args.random_crop_padding, horizontal_flip=data_args.horizontal_flip,
    )
    eval_transform = build_image_transforms(image_size, num_channels, mean, std, train=False)
    return PreparedData(
        train=train.with_transform(train_transform),
        eval=evaluation.with_transform(eval_transform),
        label_names=list(train.features["label"].names),
        image_size=image_size,
        num_channels=num_channels,
        mean=mean,
        std=std,
        name=data_args.dataset_name,
    )


def vit_config_for(model_args: ModelArguments, data: PreparedData) -> ViTConfig:
    return ViTConfig(
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size or 4 * model_args.hidden_size,
        image_size=data.image_size,
        patch_size=model_args.patch_size,
        num_channels=data.num_channels,
        layer_norm_eps=model_args.layer_norm_eps,
        num_labels=len(data.label_names),
        id2label=dict(enumerate(data.label_names)),
        label2id={name: i for i, name in enumerate(data.label_names)},
    )


def build_dense_vit(model_args: ModelArguments, data: PreparedData, seed: int) -> ViTForImageClassification:
    """The dense baseline: transformers' own ViT, with fused SDPA attention."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(vit_config_for(model_args, data))
    model.set_attn_implementation(model_args.attn_implementation)
    return model


def build_sparse_vit(
    model_args: ModelArguments,
    data: PreparedData,
    seed: int,
    token_keep_ratio: float | None = None,
    attention_keep_ratio: float | None = None,
    from_dense: ViTForImageClassification | None = None,
    **config_overrides: Any,
) -> SparseViTForImageClassification:
    """A SparseViT: converted from `model_name_or_path` or `from_dense` (same initial weights as the dense run), or
    built from scratch; `None` ratios leave the converted model's own (1.0 from scratch); `config_overrides` set
    more SparseViTConfig fields (`token_selection`, `patch_dropout_keep_ratio`, ...)."""
    overrides: dict[str, Any] = dict(token_fusion=model_args.token_fusion,
                                     attn_implementation=model_args.attn_implementation, **config_overrides)
    if token_keep_ratio is not None:
        overrides["token_keep_ratio"] = token_keep_ratio
    if attention_keep_ratio is not None:
        overrides["attention_keep_ratio"] = attention_keep_ratio
    if model_args.token_pruning_layers:
        overrides["token_pruning_layers"] = list(model_args.token_pruning_layers)
    source = model_args.model_name_or_path or from_dense or build_dense_vit(model_args, data, seed)
    return SparseViTForImageClassification.from_vit(source, **overrides)


def build_resnet(model_args: ModelArguments, data: PreparedData, seed: int) -> ResNetForImageClassification:
    """transformers' own ResNet (basic blocks, its ImageNet stem: a 28x28 input is 7x7 after it), sized by
    `resnet_hidden_sizes` / `resnet_depths`; every stage but the first halves the resolution."""
    if len(model_args.resnet_hidden_sizes) != len(model_args.resnet_depths):
        raise ValueError(
            f"`resnet_hidden_sizes` {model_args.resnet_hidden_sizes} and `resnet_depths` {model_args.resnet_depths} "
            "need one entry per stage."
        )
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=data.num_channels,
        embedding_size=model_args.resnet_hidden_sizes[0],
        hidden_sizes=list(model_args.resnet_hidden_sizes),
        depths=list(model_args.resnet_depths),
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=len(data.label_names),
        id2label=dict(enumerate(data.label_names)),
        label2id={name: i for i, name in enumerate(data.label_names)},
    )
    return ResNetForImageClassification(config)


def build_model(model_args: ModelArguments, data: PreparedData, seed: int, **sparse_vit_ratios):
    """The `model_type` from scratch (or converted): a SparseViT or a ResNet."""
    if model_args.model_type == "resnet":
        return build_resnet(model_args, data, seed)
    return build_sparse_vit(model_args, data, seed, **sparse_vit_ratios)


def compute_accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def training_fields(output_dir: str, epochs: float, batch_size: int, seed: int, evaluations: int = 0,
                    learning_rate: float = 1e-3) -> dict[str, Any]:
    """The `TrainingArguments` every experiment run shares (AdamW, cosine with 5 % warm-up, no checkpoints);
    `evaluations` >= 2 test-set evaluations spread over the run, the last at its end (with 0 or 1 the caller
    evaluates once, after training)."""
    fields: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=512,
        learning_rate=learning_rate,
        weight_decay=0.05,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # with_transform data: the transform needs the raw image column
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )
    if evaluations >= 2:  # a float eval_steps is a fraction of the run (1.0 would mean every step)
        fields.update(eval_strategy="steps", eval_steps=1.0 / evaluations)
    return fields


class TrainingClockCallback(TrainerCallback):
    """Training wall-clock without the time spent evaluating, and the accuracy curve against it."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.evaluation_seconds = 0.0
        self._evaluation_started: float | None = None
        self.curve: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._evaluation_started = time.perf_counter()  # evaluation, if any, follows the step end

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        now = time.perf_counter()
        if self._evaluation_started is not None:
            self.evaluation_seconds += now - self._evaluation_started
            self._evaluation_started = None
        if metrics and "eval_accuracy" in metrics:
            self.curve.append(
                {"step": state.global_step, "train_seconds": self.train_seconds(now), "accuracy": metrics["eval_accuracy"]}
            )

    def train_seconds(self, now: float | None = None) -> float:
        if self.start is None:
            return 0.0
        return (now or time.perf_counter()) - self.start - self.evaluation_seconds


def with_defaults_from(arguments, preset: dict[str, Any]):
    """`arguments` (a dataclass) with `preset`'s values where the command line left the field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(arguments) if f.default is not dataclasses.MISSING}
    return dataclasses.replace(arguments, **{name: value for name, value in preset.items()
                                             if getattr(arguments, name) == defaults.get(name)})


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write JSON through a temporary file: a run killed mid-write never leaves a truncated file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
    os.replace(temporary, path)


def differing_settings(held: Any, settings: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two JSON-like settings differ ("families.resnet.epochs")."""
    if isinstance(held, dict) and isinstance(settings, dict):
        return [name for key in sorted(set(held) | set(settings), key=str)
                for name in differing_settings(held.get(key), settings.get(key), f"{prefix}{key}.")]
    return [] if held == settings else [prefix.rstrip(".") or "settings"]


def load_resumable(path: str | os.PathLike, settings: dict[str, Any], fresh: bool,
                   settings_of=lambda results: results.get("settings")) -> dict[str, Any] | None:
    """The results a previous run wrote to `path`, to resume from (None when there are none, or with `fresh`). A JSON
    written with other settings is an error naming what differs, never silently mixed in or replaced."""
    if fresh or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    differ = differing_settings(settings_of(results), json.loads(json.dumps(settings)))
    if differ:
        raise ValueError(f"{path} holds results for other settings (they differ in {', '.join(differ)}). Use another "
                         "--json/--output_dir, or --fresh to overwrite.")
    return results


def escape_help_percents(parser: argparse.ArgumentParser) -> None:
    """Double each bare `%` in the help texts of `parser` and its sub-parsers: argparse %-formats them (for
    `%(default)s`), so a field's "10 %" would crash `--help`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_parser in dict.fromkeys(action.choices.values()):
                escape_help_percents(sub_parser)
        elif isinstance(action.help, str):
            action.help = re.sub(r"%%|%(?!\()", "%%", action.help)


class ConfigParser(HfArgumentParser):
    """`HfArgumentParser` whose bad flag or value is a `ValueError` (one line on the command line), not argparse's
    usage of the ~150 training flags, and whose help texts may hold a bare `%`."""

    def __init__(self, dataclass_types, **kwargs) -> None:
        super().__init__(dataclass_types, **kwargs)
        escape_help_percents(self)

    def error(self, message: str):
        raise ValueError(f"{message} (see --help).")


def parse_config(dataclass_types: tuple, argv: list[str] | None = None, prog: str | None = None,
                 defaults: dict[str, Any] | None = None) -> tuple:
    """`CONFIG.yaml [--field value ...]`: the YAML file gives the defaults, command-line flags override them; `defaults`
    replace fields' own defaults where neither sets the field. An unknown field (in the YAML or on the command line) or
    a bad value is a `ValueError` naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ConfigParser(dataclass_types, prog=prog)
    parser.set_defaults(**(defaults or {}))
    if argv and not argv[0].startswith("-"):
        argv = _config_flags(argv[0]) + argv[1:]
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        options = [option for action in parser._actions for option in action.option_strings]
        flags = [item for item in unknown if item.startswith("-")] or unknown
        hints = [f"{flag} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(flag, options, 1))
                 else flag for flag in flags]
        raise ValueError(f"unknown field(s) {', '.join(hints)}: not a field of {[t.__name__ for t in dataclass_types]} "
                         "(see --help).")
    return tuple(parsed)


def _config_flags(path: str) -> list[str]:
    """The YAML config's `field: value` pairs as command-line flags."""
    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"CONFIG must be a YAML file (.yaml or .yml), got {path!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold `field: value` lines, got a {type(values).__name__}.")
    return [item for key, value in values.items() for item in _flag(key, value)]


def _flag(key: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"--{key}", *[str(v) for v in value]]
    return [f"--{key}", str(value)]


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, MPS, XPU, ...; only CUDA is asked on torch < 2.6)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def parse_training_config(arguments_class, argv: list[str] | None = None, prog: str | None = None) -> tuple:
    """`CONFIG.yaml [--field value ...]` as (`ModelArguments`, `DataArguments`, `arguments_class`). Without an
    accelerator `use_cpu` defaults to true, which lets `accelerate launch` form a gloo group of CPU processes; it is
    decided before the training arguments are built (they set up the device) and a `use_cpu` given in the YAML or as
    a flag (`--use_cpu` or `--use-cpu`) wins."""
    defaults = {} if has_accelerator() else {"use_cpu": True}
    return parse_config((ModelArguments, DataArguments, arguments_class), argv, prog, defaults=defaults)


def train_from_config(trainer_class, arguments_class, argv: list[str] | None = None, metrics=None,
                      prog: str | None = None):
    """What `hf-sparse train` and `recipes/*.py` run: parse `CONFIG.yaml [--field value ...]`
    (`parse_training_config`), build the data and the model (`model_type`), train (resuming if asked), evaluate, and
    save the model, its card, the metrics and the trainer state. `metrics(trainer)` adds to the evaluation metrics.
    What the methods do (IMP rounds, mask sparsity, ghosts) is logged as transformers logs, at the Trainer's
    `log_level` (`hf_sparse.logging_utils`). Returns the trainer."""
    model_args, data_args, training_args = parse_training_config(arguments_class, argv, prog)
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest whole checkpoint in output_dir
    data = prepare_data(data_args, seed=training_args.seed)
    # Tri-Level's final keep ratios become the model's own at construction (ToST's arguments have none).
    model = build_model(model_args, data, training_args.seed,
                        token_keep_ratio=getattr(training_args, "token_keep_ratio", None),
                        attention_keep_ratio=getattr(training_args, "attention_keep_ratio", None))
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        compute_metrics=compute_accuracy,
        processing_class=data.image_processor(),
    )
    trainer.train(resume_from_checkpoint=resume)
    results = trainer.evaluate()
    results.update(metrics(trainer) if metrics is not None else {})
    trainer.log_metrics("eval", results)
    trainer.save_metrics("eval", results)
    trainer.save_model()
    trainer.save_state()
    trainer.accelerator.end_training()  # destroys the process group cleanly under `accelerate launch`
    return trainer
