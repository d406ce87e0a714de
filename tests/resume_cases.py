"""The same tiny training run for every trainer, for the stop-and-resume tests (in-process and SIGKILL)."""

from __future__ import annotations

from hf_sparse import ToSTTrainer, ToSTTrainingArguments, TriLevelTrainer, TriLevelTrainingArguments
from hf_sparse.tost import get_masks

from tri_level_helpers import tiny_image_dataset, tiny_sparse_vit, with_tiny_transform

# 3 epochs of 64 examples in batches of 8: the Tri-Level run trains 48 per epoch (25 % inactive), ToST all 64.
TOTAL_STEPS = {"tri_level": 18, "tost": 24}


def build_trainer(name: str, output_dir: str, callbacks=None, model_seed: int = 0):
    data = with_tiny_transform(tiny_image_dataset(64), train=False)
    common = dict(
        output_dir=output_dir, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=3e-3,
        save_strategy="steps", save_steps=4, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if name == "tri_level":
        args = TriLevelTrainingArguments(
            **common, example_pruning="forgetting", example_inactive_fraction=0.25, example_refresh_fraction=0.34,
            example_last_refresh_fraction=1.0, example_swap_fraction=0.125, token_keep_ratio=0.5,
            attention_keep_ratio=0.5, sparsity_warmup_fraction=0.1, sparsity_decay_fraction=0.5,
        )
        return TriLevelTrainer(model=tiny_sparse_vit(model_seed), args=args, train_dataset=data, callbacks=callbacks)
    if name == "tost":
        args = ToSTTrainingArguments(
            **common, mask_method="snip", sparsity=0.8, ghost_end_fraction=0.6, rescaled_init="gradinit", ghost_soft_neurons=True,
            ghost_skip_connections=True,
            rescaled_init_steps=2, label_smoothing=0.1,
        )
        return ToSTTrainer(model=tiny_sparse_vit(model_seed), args=args, train_dataset=data, callbacks=callbacks)
    raise ValueError(f"unknown trainer {name!r}")


def final_state(trainer) -> dict:
    """What must match between an uninterrupted run and a killed-and-resumed one."""
    state = {"weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
    pruner = getattr(trainer, "example_pruner", None)
    if pruner is not None:
        state["active"] = pruner.active_mask().clone()
    for name, mask in get_masks(trainer.model).items():
        state[f"mask:{name}"] = mask.clone()
    return state
