"""Image transforms for training and evaluation, with PIL + numpy + torch only.

No torchvision or timm: on these machines either one pulls a multi-GB CUDA build of torch.
:func:`build_image_transforms` returns a batch function for ``dataset.with_transform``;
:func:`image_processor_for` returns the matching ``transformers`` image processor (PIL backend) to
save next to a model, so ``pipeline("image-classification")`` preprocesses exactly like evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..validation import check_choice, check_int

__all__ = ["ImageTransform", "build_image_transforms", "image_processor_for"]

# The resampling filter used by both the transforms and the image processor (ViT's default).
_RESAMPLE = Image.Resampling.BILINEAR


def _check_normalisation(name: str, values: Sequence[float], num_channels: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size not in (1, num_channels):
        raise ValueError(f"{name} needs 1 or num_channels={num_channels} values, got {list(values)}.")
    if name == "std" and (array <= 0).any():
        raise ValueError(f"std values must be > 0, got {list(values)}.")
    return np.broadcast_to(array, (num_channels,)).copy()


class ImageTransform:
    """Batch transform: ``{"image": [PIL images], "label": [...]}`` -> ``{"pixel_values", "labels"}``.

    ``pixel_values`` is a float32 tensor (B, C, H, W), ``(x / 255 - mean) / std``; ``labels`` a
    LongTensor (omitted when the batch has no ``label``). A class rather than a closure so that it
    pickles into DataLoader worker processes.
    """

    def __init__(
        self,
        image_size: int,
        num_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        random_crop_padding: int = 0,
        horizontal_flip: bool = False,
    ) -> None:
        check_int("image_size", image_size, minimum=1)
        check_choice("num_channels", num_channels, (1, 3))  # mode "L" or "RGB"
        check_int("random_crop_padding", random_crop_padding, minimum=0)
        self.image_size = image_size
        self.num_channels = num_channels
        self.mode = "L" if num_channels == 1 else "RGB"
        self.mean = _check_normalisation("mean", mean, num_channels)
        self.std = _check_normalisation("std", std, num_channels)
        self.train = bool(train)
        # Augmentation only ever applies to training batches.
        self.random_crop_padding = random_crop_padding if train else 0
        self.horizontal_flip = bool(horizontal_flip) and self.train
        # (x / 255 - mean) / std == x * scale + shift, one fused pass over the batch.
        self._scale = torch.from_numpy(1.0 / (255.0 * self.std)).view(1, -1, 1, 1)
        self._shift = torch.from_numpy(-self.mean / self.std).view(1, -1, 1, 1)

    def _to_array(self, image: Any) -> np.ndarray:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), resample=_RESAMPLE)
        array = np.asarray(image, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array  # (H, W, C)

    def _augment(self, batch: np.ndarray) -> np.ndarray:
        """Random crop with zero padding and horizontal flip on a (B, H, W, C) uint8 batch."""
        # Seeded from torch's RNG so augmentation follows the Trainer seed (and DataLoader workers,
        # which torch seeds differently, draw different crops).
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        size, pad = self.image_size, self.random_crop_padding
        count = batch.shape[0]
        if pad > 0:
            padded = np.pad(batch, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            top = rng.integers(0, 2 * pad + 1, size=count)
            left = rng.integers(0, 2 * pad + 1, size=count)
            rows = top[:, None] + np.arange(size)  # (B, H)
            cols = left[:, None] + np.arange(size)  # (B, W)
            batch = padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self.horizontal_flip:
            flip = rng.random(count) < 0.5
            batch[flip] = batch[flip][:, :, ::-1]
        return batch

    def __call__(self, examples: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        # A fresh (B, H, W, C) uint8 array: augmentation may write into it.
        batch = np.stack([self._to_array(image) for image in examples["image"]])
        if self.random_crop_padding or self.horizontal_flip:
            batch = self._augment(batch)
        pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(torch.float32)
        output = {"pixel_values": (pixels * self._scale + self._shift).contiguous()}
        if "label" in examples:
            output["labels"] = torch.as_tensor(np.asarray(examples["label"]), dtype=torch.long)
        return output

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, num_channels={self.num_channels}, "
            f"mean={self.mean.tolist()}, std={self.std.tolist()}, train={self.train}, "
            f"random_crop_padding={self.random_crop_padding}, horizontal_flip={self.horizontal_flip})"
        )


def build_image_transforms(
    image_size: int,
    num_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    random_crop_padding: int = 0,
    horizontal_flip: bool = False,
) -> Callable[[dict[str, list[Any]]], dict[str, torch.Tensor]]:
    """A batch transform for ``dataset.with_transform(fn)``.

    Images are converted to mode "L" (1 channel) or "RGB" (3), resized (bilinear) only when their
    size differs from ``image_size``, scaled to [0, 1] and normalised with ``mean``/``std``. With
    ``train=True``, optional augmentation: a random ``image_size`` crop of the image zero-padded by
    ``random_crop_padding`` pixels, and a horizontal flip with probability 0.5. Evaluation transforms
    (``train=False``) never augment and match :func:`image_processor_for` to 1e-5.
    """
    return ImageTransform(image_size, num_channels, mean, std, train, random_crop_padding, horizontal_flip)


def image_processor_for(image_size: int, num_channels: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """A ``transformers.ViTImageProcessorPil`` equivalent to ``build_image_transforms(train=False)``.

    It runs without torchvision, saves with ``save_pretrained`` (as ``ViTImageProcessor``, which
    ``AutoImageProcessor`` reloads with the PIL backend when torchvision is absent) and serves
    ``pipeline("image-classification")``. It always converts inputs to RGB, as the pipeline does anyway
    (transformers' ``load_image``). For a 1-channel model it repeats the mean and std over the three
    channels: SparseViT turns a 3-channel input of a 1-channel model into its luma (PIL's "L" weights),
    and as normalisation is per channel and linear, that equals normalising the greyscale image.
    """
    from transformers import ViTImageProcessorPil  # deferred: keeps `import hf_sparse.data` light

    check_choice("num_channels", num_channels, (1, 3))
    check_int("image_size", image_size, minimum=1)
    mean_values = _check_normalisation("mean", mean, num_channels).tolist()
    std_values = _check_normalisation("std", std, num_channels).tolist()
    if num_channels == 1:
        mean_values, std_values = mean_values * 3, std_values * 3
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=_RESAMPLE,  # PIL returns an unchanged copy when the size already matches
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean_values,
        image_std=std_values,
        do_convert_rgb=True,
    )
