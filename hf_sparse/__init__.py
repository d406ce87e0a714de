"""hf_sparse: efficient and sparse Vision Transformer training for the Hugging Face ecosystem.

Importing the package registers SparseViT with `AutoConfig`, `AutoModel` and `AutoModelForImageClassification`.
Methods: `hf_sparse.tri_level` (Tri-Level E-ViT) and `hf_sparse.tost` (ToST); the model: `hf_sparse.models.sparse_vit`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .hub import TrainingReport, build_model_card, push_checkpoint, push_to_hub, save_for_hub
from .models.sparse_vit import (
    SparseViTConfig,
    SparseViTForImageClassification,
    SparseViTImageClassifierOutput,
    SparseViTModel,
    SparseViTModelOutput,
    SparseViTPreTrainedModel,
)
from .tost import ToSTTrainer, ToSTTrainingArguments
from .tri_level import TriLevelTrainer, TriLevelTrainingArguments


__version__ = "0.2.0"

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
    "ToSTTrainer",
    "ToSTTrainingArguments",
    "TrainingReport",
    "TriLevelTrainer",
    "TriLevelTrainingArguments",
    "build_model_card",
    "push_checkpoint",
    "push_to_hub",
    "save_for_hub",
]
