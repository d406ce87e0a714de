"""hf_sparse: efficient and sparse Vision Transformer training for the Hugging Face ecosystem.

Importing the package registers SparseViT with `AutoConfig`, `AutoModel` and `AutoModelForImageClassification`.
Methods: `hf_sparse.tri_level` (Tri-Level E-ViT) and `hf_sparse.tost` (ToST); the model: `hf_sparse.models.sparse_vit`.
"""

import re
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version
from pathlib import Path

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


def _package_version() -> str:
    """The version in pyproject.toml (written only there): from the installed metadata, or, in a source checkout that
    was never installed, from the file itself."""
    try:
        return _distribution_version("hf_sparse")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject.read_text()) if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


__version__ = _package_version()

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
