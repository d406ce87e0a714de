"""Shared pieces of the recipes and the demo: argument dataclasses, data, model, metrics and timing.

`recipes/*.py` parse a YAML config into these dataclasses (transformers' `HfArgumentParser`) and call the
functions below, so a recipe run and the `hf-sparse demo` build models and data the same way.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from transformers import HfArgumentParser, TrainerCallback, ViTConfig, ViTForImageClassification

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_image_transforms, image_processor_for
from .data import load_image_classification_dataset
from .models.sparse_vit import SparseViTForImageClassification


@dataclass
class ModelArguments:
    """The model to train: a SparseViT from scratch (default) or converted from a local ViT/DeiT checkpoint."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local ViT/DeiT image-classification checkpoint to convert (default: scratch)."}
    )
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    patch_size: int = 4
    layer_norm_eps: float = 1e-6
    token_pruning_layers: str | None = field(
        default=None, metadata={"help": "Comma-separated 0-based layer indices (default: 1/4, 2/4, 3/4 of depth)."}
    )
    token_fusion: bool = False
    attn_implementation: str = field(default="sdpa", metadata={"choices": ["sdpa", "eager"]})


@dataclass
class DataArguments:
    """An image-classification data set: the built-in Fashion-MNIST or anything `datasets.load_dataset` reads."""

    dataset_name: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist', a Hub name or a folder."})
    train_split: str = "train"
    eval_split: str = "test"
    image_column: str | None = None
    label_column: str | None = None
    image_size: int | None = field(default=None, metadata={"help": "Resize to this size (default: the data's)."})
    num_channels: int | None = field(default=None, metadata={"help": "1 or 3 (default: 1 for Fashion-MNIST, else 3)."})
    image_mean: str | None = field(default=None, metadata={"help": "Comma-separated means (default: per data set)."})
    image_std: str | None = field(default=None, metadata={"help": "Comma-separated stds (default: per data set)."})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    random_crop_padding: int = 0
    horizontal_flip: bool = False


@dataclass
class PreparedData:
    train: Any
    eval: Any
    label_names: list[str]
    image_size: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def image_processor(self):
        return image_processor_for(self.image_size, self.num_channels, self.mean, self.std)


def _floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(x) for x in text.split(","))


def prepare_data(data_args: DataArguments, seed: int = 0) -> PreparedData:
    train = load_image_classification_dataset(
        data_args.dataset_name, data_args.train_split, data_args.image_column, data_args.label_column
    )
    evaluation = load_image_classification_dataset(
        data_args.dataset_name, data_args.eval_split, data_args.image_column, data_args.label_column
    )
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    builtin = data_args.dataset_name.replace("-", "_") == "fashion_mnist"
    num_channels = data_args.num_channels or (1 if builtin else 3)
    image_size = data_args.image_size or train[0]["image"].size[0]
    mean = _floats(data_args.image_mean) or (FASHION_MNIST_MEAN if builtin else (0.5,) * num_channels)
    std = _floats(data_args.image_std) or (FASHION_MNIST_STD if builtin else (0.5,) * num_channels)
    train_transform = build_image_transforms(
        image_size, num_channels, mean, std, train=True,
        random_crop_padding=data_args.random_crop_padding, horizontal_flip=data_args.horizontal_flip,
    )
    eval_transform = build_image_transforms(image_size, num_channels, mean, std, train=False)
    label_names = train.features["label"].names
    return PreparedData(
        train=train.with_transform(train_transform),
        eval=evaluation.with_transform(eval_transform),
        label_names=list(label_names),
        image_size=image_size,
        num_channels=num_channels,
        mean=tuple(mean),
        std=tuple(std),
    )


def vit_config_for(model_args: ModelArguments, data: PreparedData) -> ViTConfig:
    return ViTConfig(
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
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
    import torch

    torch.manual_seed(seed)
    model = ViTForImageClassification(vit_config_for(model_args, data))
    model.set_attn_implementation(model_args.attn_implementation)
    return model


def build_sparse_vit(
    model_args: ModelArguments,
    data: PreparedData,
    seed: int,
    token_keep_ratio: float = 1.0,
    attention_keep_ratio: float = 1.0,
    from_dense: ViTForImageClassification | None = None,
) -> SparseViTForImageClassification:
    """A SparseViT: converted from `model_name_or_path` or `from_dense` (same initial weights as the dense run), or
    built from scratch."""
    overrides: dict[str, Any] = dict(
        token_keep_ratio=token_keep_ratio,
        attention_keep_ratio=attention_keep_ratio,
        token_fusion=model_args.token_fusion,
        attn_implementation=model_args.attn_implementation,
    )
    if model_args.token_pruning_layers:
        overrides["token_pruning_layers"] = [int(x) for x in model_args.token_pruning_layers.split(",")]
    source = model_args.model_name_or_path or from_dense or build_dense_vit(model_args, data, seed)
    return SparseViTForImageClassification.from_vit(source, **overrides)


def compute_accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


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


def parse_config(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """`CONFIG.yaml [--field value ...]`: the YAML file gives the defaults, command-line flags override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        argv = [item for key, value in values.items() for item in _flag(key, value)] + argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def _flag(key: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"--{key}", *[str(v) for v in value]]
    return [f"--{key}", str(value)]

