"""Data for hf_sparse: the built-in Fashion-MNIST, a loader for any image-classification set, image transforms."""

from .fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASS_NAMES,
    FASHION_MNIST_HUB_NAME,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_features,
    hf_sparse_cache_dir,
    load_fashion_mnist,
    load_image_classification_dataset,
    prepare_image_classification_columns,
    read_idx,
)
from .transforms import ImageTransform, build_image_transforms, image_processor_for

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_HUB_NAME",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ImageTransform",
    "build_image_transforms",
    "fashion_mnist_features",
    "hf_sparse_cache_dir",
    "image_processor_for",
    "load_fashion_mnist",
    "load_image_classification_dataset",
    "prepare_image_classification_columns",
    "read_idx",
]
