from .tost import ToSTTrainer, ToSTTrainingArguments
from .tri_level import TriLevelTrainer, TriLevelTrainingArguments


__all__ = ["ToSTTrainer", "ToSTTrainingArguments", "TriLevelTrainer", "TriLevelTrainingArguments"]
