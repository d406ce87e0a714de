"""Tiny data and models for the trainer tests: an image-classification `datasets.Dataset` with an `Image` feature,
used through `with_transform` as users do, and a SparseViT and a ResNet small enough to train in seconds on CPU."""

from __future__ import annotations

import datasets
import numpy as np
import torch

from transformers import ResNetConfig, ResNetForImageClassification, TrainerCallback

from hf_sparse import SparseViTConfig, SparseViTForImageClassification
from hf_sparse.data import build_image_transforms


def tiny_image_dataset(num_examples: int = 64, num_classes: int = 4, size: int = 8, seed: int = 0) -> datasets.Dataset:
    """Grey images whose class decides which quadrant is bright, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_examples)
    images = []
    half = size // 2
    for label in labels:
        pixels = rng.integers(0, 60, (size, size)).astype(np.uint8)
        row, column = divmod(int(label), 2)
        pixels[row * half : (row + 1) * half, column * half : (column + 1) * half] += 150
        images.append(pixels)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)])}
    )
    from PIL import Image

    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in images], "label": labels.tolist()}, features=features
    )


def with_tiny_transform(dataset: datasets.Dataset, size: int = 8, train: bool = True) -> datasets.Dataset:
    return dataset.with_transform(build_image_transforms(size, 1, (0.5,), (0.5,), train=train))


def tiny_sparse_vit(seed: int = 0, **overrides) -> SparseViTForImageClassification:
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=2,
        num_channels=1,
        num_labels=4,
        token_pruning_layers=[0, 1],
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return SparseViTForImageClassification(SparseViTConfig(**fields))


def tiny_resnet(seed: int = 0, **overrides) -> ResNetForImageClassification:
    """transformers' ResNet, two stages of one basic block (8 and 16 channels): 5 prunable convolutions."""
    fields = dict(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                  num_labels=4, downsample_in_first_stage=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    return ResNetForImageClassification(ResNetConfig(**fields))


class StopAt(TrainerCallback):
    """Stops training at `step` (the stop-and-resume tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
