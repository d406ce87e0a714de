"""What the hf_sparse trainers share (the trainers themselves are `hf_sparse.tri_level` and `hf_sparse.tost`)."""

from .base import SparseTrainer
from .checkpoints import checkpoint_problems, resolve_resume_checkpoint
from .data_checks import check_classification_dataset


__all__ = ["SparseTrainer", "check_classification_dataset", "checkpoint_problems", "resolve_resume_checkpoint"]
