"""Tri-Level E-ViT training from a YAML config: a thin script over `hf-sparse train tri-level`
(`hf_sparse/experiments/train.py`, shipped in the package).

    python recipes/tri_level.py recipes/configs/tri_level_fashion_mnist.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/tri_level.py CONFIG
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml -m hf_sparse.experiments.train tri-level CONFIG

The YAML holds fields of `ModelArguments`, `DataArguments` (hf_sparse.experiments.common) and
`TriLevelTrainingArguments`; command-line flags override it. The final token and attention keep ratios given here
become the model's own (saved with it and used for evaluation). A bad field or value is one line and exit status 2.
"""

import sys

from hf_sparse.experiments.train import main_tri_level


if __name__ == "__main__":
    sys.exit(main_tri_level())
