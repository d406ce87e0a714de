"""Tri-Level E-ViT training from a YAML config.

    python recipes/tri_level.py recipes/configs/tri_level_fashion_mnist.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/tri_level.py CONFIG

The YAML holds fields of `ModelArguments`, `DataArguments` (hf_sparse.experiments.common) and
`TriLevelTrainingArguments`; command-line flags override it. The final token and attention keep ratios given here
become the model's own (saved with it and used for evaluation).
"""

from hf_sparse import TriLevelTrainer, TriLevelTrainingArguments
from hf_sparse.experiments.common import train_from_config


if __name__ == "__main__":
    train_from_config(TriLevelTrainer, TriLevelTrainingArguments)
