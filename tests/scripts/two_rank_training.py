"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): trains a tiny model with one of the
hf_sparse trainers and writes, per rank, what must be identical across ranks."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tri_level_helpers import tiny_image_dataset, tiny_resnet, tiny_sparse_vit, with_tiny_transform  # noqa: E402

from hf_sparse import ToSTTrainer, ToSTTrainingArguments, TriLevelTrainer, TriLevelTrainingArguments  # noqa: E402


def write_rank_record(trainer, output_dir: str, record: dict) -> None:
    """This rank's `rank{N}.json`: `record` plus the rank, the world size and a checksum of the trained weights."""
    record = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        **record,
        "weights_checksum": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
    }
    with open(os.path.join(output_dir, f"rank{record['rank']}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def ddp_settings(trainer) -> dict:
    """How the Trainer's DDP wrapper was built (`model_wrapped` is the DistributedDataParallel module)."""
    wrapped = trainer.model_wrapped
    return {
        "ddp_wrapper": type(wrapped).__name__,
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
    }


def main(trainer_name: str, output_dir: str) -> None:
    data = with_tiny_transform(tiny_image_dataset(64), train=False)
    if trainer_name in ("tost", "tost_resnet"):
        return main_tost(data, output_dir, resnet=trainer_name == "tost_resnet")
    if trainer_name == "infobatch":
        return main_infobatch(data, output_dir)
    if trainer_name != "tri_level":
        raise SystemExit(f"unknown trainer {trainer_name}")
    args = TriLevelTrainingArguments(
        output_dir=output_dir, num_train_epochs=3, per_device_train_batch_size=4, learning_rate=3e-3,
        save_strategy="steps", save_steps=3, logging_steps=1, report_to=[], seed=0, disable_tqdm=True, use_cpu=True,
        example_pruning="forgetting", example_inactive_fraction=0.25, example_refresh_fraction=0.34,
        example_last_refresh_fraction=1.0, example_swap_fraction=0.125, token_keep_ratio=0.5,
        sparsity_warmup_fraction=0.0, sparsity_decay_fraction=0.5,
    )
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data)
    trainer.train()
    pruner = trainer.example_pruner
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "global_step": trainer.state.global_step,
        "active": torch.nonzero(pruner.active_mask()).flatten().tolist(),
        "epoch_order": pruner.epoch_indices(pruner.current_epoch).tolist(),
        "forgetting_count": pruner.forgetting_count.tolist() if hasattr(pruner, "forgetting_count") else None,
        "samples_seen": trainer.samples_seen,
        "first_loss": sum(losses[:4]) / 4,
        "last_loss": sum(losses[-4:]) / 4,
        **ddp_settings(trainer),
    }
    write_rank_record(trainer, output_dir, record)


def main_infobatch(data, output_dir: str) -> None:
    """InfoBatch itself: epochs vary in size, planned per epoch from losses gathered across ranks."""
    # delta 0.75 of 4 epochs: epochs 1-2 (0-based) may prune, the last one trains everything (InfoBatch's annealing)
    args = TriLevelTrainingArguments(
        output_dir=output_dir, num_train_epochs=4, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="linear", save_strategy="no", logging_steps=1, report_to=[], seed=0, disable_tqdm=True,
        use_cpu=True, example_pruning="infobatch", infobatch_delta=0.75, token_keep_ratio=1.0,
        attention_keep_ratio=1.0,
    )
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data)
    trainer.train()
    pruner = trainer.example_pruner
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "num_examples": len(data),
        "epoch_sizes": pruner.epoch_sizes,
        "optimizer_steps_per_epoch": pruner.optimizer_steps_per_epoch,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "final_learning_rate": trainer.lr_scheduler.get_last_lr()[0],
        "epoch_order": pruner.epoch_indices(pruner.current_epoch).tolist(),
        "last_loss": pruner.last_loss.tolist(),
        "losses": losses,
    }
    write_rank_record(trainer, output_dir, record)


def main_tost(data, output_dir: str, resnet: bool = False) -> None:
    from hf_sparse.tost import get_masks

    # The ResNet finds a lottery ticket: its IMP rounds are Trainer runs of their own, under DDP as well.
    mask = dict(mask_method="lottery_ticket", lottery_ticket_round_fraction=0.25) if resnet else dict(
        mask_method="snip", mask_batches=2)
    args = ToSTTrainingArguments(
        output_dir=output_dir, num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="steps", save_steps=8, logging_steps=1, report_to=[], seed=0,
        disable_tqdm=True, use_cpu=True, sparsity=0.8, rescaled_init="gradinit", rescaled_init_steps=2,
        ghost_end_fraction=0.3, ghost_soft_neurons=True, ghost_skip_connections=True, label_smoothing=0.1, **mask,
    )
    trainer = ToSTTrainer(model=tiny_resnet() if resnet else tiny_sparse_vit(), args=args, train_dataset=data)
    trainer.train()
    masks = get_masks(trainer.model)
    modules = dict(trainer.model.named_modules())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "global_step": trainer.state.global_step,
        "masks_identical_before_sync": trainer.sparsity_setup["masks_identical_across_ranks"],
        "mask_sparsity": trainer.sparsity_setup["mask_sparsity"],
        # position-weighted sums (exact in float64): equal sums <=> equal masks, for practical purposes
        "mask_checksums": {
            name: float((mask.flatten().double() * torch.arange(1, mask.numel() + 1, dtype=torch.float64)).sum())
            for name, mask in masks.items()
        },
        "pruned_nonzero": sum(int(torch.count_nonzero(modules[name].weight[~mask])) for name, mask in masks.items()),
        "ghost_removed_at_step": trainer.ghost_removed_at_step,
        "first_loss": sum(losses[:4]) / 4,
        "last_loss": sum(losses[-4:]) / 4,
        **ddp_settings(trainer),
    }
    write_rank_record(trainer, output_dir, record)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Tear the gloo group down before the interpreter exits: left to interpreter shutdown, a rank can abort
    # ("terminate called without an active exception").
    from accelerate import PartialState

    PartialState().destroy_process_group()
