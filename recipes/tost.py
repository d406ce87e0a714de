"""ToST sparse training (a weight mask trained with ghost neurons/skips, rescaled init and label smoothing) from a
YAML config.

    python recipes/tost.py recipes/configs/tost_fashion_mnist.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/tost.py CONFIG

The YAML holds fields of `ModelArguments`, `DataArguments` (hf_sparse.experiments.common) and
`ToSTTrainingArguments`; command-line flags override it (e.g. `--mask_method grasp --sparsity 0.95`, or
`--ghost_soft_neurons false` for an ablation). The mask is computed when training starts;
`--resume_from_checkpoint PATH` reloads it from the checkpoint instead. The saved model has the exact zeros,
`sparsity_masks.safetensors` beside it and the measured sparsity in its metrics.
"""

from hf_sparse import ToSTTrainer, ToSTTrainingArguments
from hf_sparse.experiments.common import train_from_config
from hf_sparse.tost import sparsity_report


def sparsity_metrics(trainer) -> dict:
    report = sparsity_report(trainer.model)
    return {"eval_prunable_sparsity": report["prunable_sparsity"], "eval_total_sparsity": report["total_sparsity"]}


if __name__ == "__main__":
    train_from_config(ToSTTrainer, ToSTTrainingArguments, metrics=sparsity_metrics)
