"""ToST sparse training (a weight mask trained with ghost neurons/skips, rescaled init and label smoothing) from a
YAML config.

    python recipes/tost.py recipes/configs/tost_fashion_mnist.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/tost.py CONFIG

The YAML holds fields of `ModelArguments`, `DataArguments` (hf_sparse.run) and `ToSTTrainingArguments`; command-line
flags override it (e.g. `--mask_method grasp --sparsity 0.95`, or `--ghost_soft_neurons false` for an ablation).
The mask is computed when training starts; `--resume_from_checkpoint PATH` reloads it from the checkpoint instead.
"""

from __future__ import annotations

import logging
import sys

import torch

from hf_sparse import ToSTTrainer, ToSTTrainingArguments
from hf_sparse.run import DataArguments, ModelArguments, build_sparse_vit, compute_accuracy, parse_config, prepare_data
from hf_sparse.sparsity import sparsity_report


def main() -> None:
    model_args, data_args, training_args = parse_config((ModelArguments, DataArguments, ToSTTrainingArguments))
    if not torch.cuda.is_available() and not training_args.use_cpu:
        training_args.use_cpu = True  # lets `accelerate launch` on a CPU box form a gloo group
    # The mask's per-layer sparsity, the IMP rounds and the ghost removal are logged by hf_sparse (main process).
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger("hf_sparse").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    data = prepare_data(data_args, seed=training_args.seed)
    model = build_sparse_vit(model_args, data, training_args.seed)
    trainer = ToSTTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        compute_metrics=compute_accuracy,
        processing_class=data.image_processor(),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    report = sparsity_report(trainer.model)
    metrics["eval_prunable_sparsity"] = report["prunable_sparsity"]
    metrics["eval_total_sparsity"] = report["total_sparsity"]
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_model()  # weights with exact zeros + sparsity_masks.safetensors + config.weight_sparsity
    trainer.save_state()
    trainer.accelerator.end_training()  # destroys the process group cleanly under `accelerate launch`


if __name__ == "__main__":
    main()
