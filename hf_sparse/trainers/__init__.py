from .tri_level import TriLevelTrainer, TriLevelTrainingArguments
