"""Tri-Level E-ViT training from a YAML config.

    python recipes/tri_level.py recipes/configs/tri_level_fashion_mnist.yaml [--field value ...]
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/tri_level.py CONFIG

The YAML holds fields of `ModelArguments`, `DataArguments` (hf_sparse.run) and `TriLevelTrainingArguments`;
command-line flags override it.
"""

from __future__ import annotations

import torch

from hf_sparse import TriLevelTrainer, TriLevelTrainingArguments
from hf_sparse.run import DataArguments, ModelArguments, build_sparse_vit, compute_accuracy, parse_config, prepare_data


def main() -> None:
    model_args, data_args, training_args = parse_config((ModelArguments, DataArguments, TriLevelTrainingArguments))
    if not torch.cuda.is_available() and not training_args.use_cpu:
        training_args.use_cpu = True  # lets `accelerate launch` on a CPU box form a gloo group
    data = prepare_data(data_args, seed=training_args.seed)
    model = build_sparse_vit(
        model_args, data, training_args.seed, training_args.token_keep_ratio, training_args.attention_keep_ratio
    )
    trainer = TriLevelTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        compute_metrics=compute_accuracy,
        processing_class=data.image_processor(),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_model()
    trainer.save_state()
    trainer.accelerator.end_training()  # destroys the process group cleanly under `accelerate launch`


if __name__ == "__main__":
    main()
