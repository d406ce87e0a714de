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
from .hub import TrainingReport, build_model_card, push_checkpoint, write_save_extras
from .models.sparse_vit import modeling_sparse_vit as _modeling_sparse_vit
from .trainers import ToSTTrainer, ToSTTrainingArguments, TriLevelTrainer, TriLevelTrainingArguments


__version__ = "0.1.0"

AutoConfig.register(SparseViTConfig.model_type, SparseViTConfig, exist_ok=True)
AutoModel.register(SparseViTConfig, SparseViTModel, exist_ok=True)
AutoModelForImageClassification.register(SparseViTConfig, SparseViTForImageClassification, exist_ok=True)
# Saved folders carry the model code (for Hub users without this package), the processor config and our card.
SparseViTConfig.register_for_auto_class()
SparseViTModel.register_for_auto_class("AutoModel")
SparseViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
if write_save_extras not in _modeling_sparse_vit.SAVE_PRETRAINED_EXTRAS:
    _modeling_sparse_vit.SAVE_PRETRAINED_EXTRAS.append(write_save_extras)

__all__ = [
    "build_model_card",
    "push_checkpoint",
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
]
