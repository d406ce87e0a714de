"""ToST sparse training (a weight mask trained with ghost neurons/skips, rescaled init and label smoothing) from a
YAML config: a thin script over `hf-sparse train tost` (`hf_sparse/experiments/train.py`, shipped in the package).

    python recipes/tost.py recipes/configs/tost_fashion_mnist.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/tost.py CONFIG
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml -m hf_sparse.experiments.train tost CONFIG

The YAML holds fields of `ModelArguments`, `DataArguments` (hf_sparse.experiments.common) and
`ToSTTrainingArguments`; command-line flags override it (e.g. `--mask_method grasp --sparsity 0.95`, or
`--ghost_soft_neurons false` for an ablation). The mask is computed when training starts;
`--resume_from_checkpoint PATH` reloads it from the checkpoint instead. The saved model has the exact zeros,
`sparsity_masks.safetensors` beside it and the measured sparsity in its metrics. A bad field or value is one line and
exit status 2.
"""

import sys

from hf_sparse.experiments.train import main_tost


if __name__ == "__main__":
    sys.exit(main_tost())
