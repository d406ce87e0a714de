"""hf_sparse: efficient and sparse Vision Transformer training for the Hugging Face ecosystem.

Importing the package registers SparseViT with `AutoConfig`, `AutoModel` and `AutoModelForImageClassification`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .models.sparse_vit import (
    SparseViTConfig,
    SparseViTForImageClassification,
    SparseViTImageClassifierOutput,
    SparseViTModel,
    SparseViTModelOutput,
    SparseViTPreTrainedModel,
)
from .trainers import TriLevelTrainer, TriLevelTrainingArguments


__version__ = "0.1.0"

AutoConfig.register(SparseViTConfig.model_type, SparseViTConfig, exist_ok=True)
AutoModel.register(SparseViTConfig, SparseViTModel, exist_ok=True)
AutoModelForImageClassification.register(SparseViTConfig, SparseViTForImageClassification, exist_ok=True)

__all__ = [
    "SparseViTConfig",
    "SparseViTForImageClassification",
    "SparseViTImageClassifierOutput",
    "SparseViTModel",
    "SparseViTModelOutput",
    "SparseViTPreTrainedModel",
    "TriLevelTrainer",
    "TriLevelTrainingArguments",
]
