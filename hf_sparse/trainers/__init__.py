from .tri_level import TriLevelTrainer, TriLevelTrainingArguments
from .tost import ToSTTrainer, ToSTTrainingArguments
