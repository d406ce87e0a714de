from .configuration_sparse_vit import SparseViTConfig
from .modeling_sparse_vit import (
    SparseViTForImageClassification,
    SparseViTImageClassifierOutput,
    SparseViTModel,
    SparseViTModelOutput,
    SparseViTPreTrainedModel,
)


__all__ = [
    "SparseViTConfig",
    "SparseViTForImageClassification",
    "SparseViTImageClassifierOutput",
    "SparseViTModel",
    "SparseViTModelOutput",
    "SparseViTPreTrainedModel",
]
