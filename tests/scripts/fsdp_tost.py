"""ToST weight masks under FSDP2 on 2 CPU processes (gloo); run by tests/test_tost_fsdp.py.

`python -m torch.distributed.run --nproc_per_node 2 fsdp_tost.py api OUTPUT_DIR`: masks a tiny HF ViT with the
project's API, shards it with `fully_shard` (an uneven shard included), trains a few AdamW steps with gradient
accumulation, saves the whole weights (safetensors) and masks, loads the masks into a freshly sharded model, tries the
refused set-up (a model sharded before `ToSTTrainer`), measures the sparsity of a model with sharded and unsharded
masked weights, and writes per rank what the test checks (`rank{r}.json`).

It works at the level of `fully_shard` because accelerate (1.x) turns FSDP on only for GPU-like distributed types: on
CPU processes the Trainer's `fsdp=True` fails with "Using fsdp only works in distributed training", so `ToSTTrainer`
under FSDP2 cannot be driven on CPU (the trainer itself reaches the same code: masks applied before the Trainer shards
the model, `MaskCallback.on_train_begin` moving hooks and masks onto the shards).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import ViTConfig, ViTForImageClassification

from hf_sparse.tost.masks import (
    MaskConfig,
    get_masks,
    load_masks,
    masked_weight_sparsity,
    prune_model,
    read_masks,
    reapply,
    save_masks,
)
from hf_sparse.tost.masks.model import _masked_weights  # the local masks the project computed


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=67, image_size=8,
                       patch_size=4, num_labels=3, attn_implementation="eager")  # 67 rows: an uneven shard
    return ViTForImageClassification(config)


def shard(model: ViTForImageClassification) -> ViTForImageClassification:
    for layer in model.vit.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def batches(count: int, rank: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as under a sharded sampler
    return [{"pixel_values": torch.randn(4, 3, 8, 8, generator=generator),
             "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(count)]


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def largest_pruned(tensor: torch.Tensor, pruned: torch.Tensor) -> float:
    values = local(tensor).detach()[pruned]
    return float(values.abs().max()) if values.numel() else 0.0


def pruned_values(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """The largest |weight|, |grad| and |Adam moment| over the pruned entries of this rank's shards."""
    largest = {"weight": 0.0, "grad": 0.0, "moment": 0.0}
    for entry in _masked_weights(model):
        largest["weight"] = max(largest["weight"], largest_pruned(entry.weight, entry.pruned))
        if entry.weight.grad is not None:
            largest["grad"] = max(largest["grad"], largest_pruned(entry.weight.grad, entry.pruned))
        for key in ("exp_avg", "exp_avg_sq"):
            if optimizer is not None and key in optimizer.state[entry.weight]:
                moment = optimizer.state[entry.weight][key]
                largest["moment"] = max(largest["moment"], largest_pruned(moment, entry.pruned))
    return largest


def main_api(output_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_vit()
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.6))  # the same on every rank: same seed
    whole_masks = {name: mask.clone() for name, mask in get_masks(model).items()}
    shard(model)
    reapply(model)  # moves the gradient hooks onto the sharded parameters
    sharded = all(isinstance(module.weight, DTensor) for module in model.modules() if hasattr(module, "weight_mask"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    record = {"rank": rank, "sharded": sharded, "steps": []}
    data = batches(6, rank)
    for step in range(3):
        for batch in data[2 * step : 2 * step + 2]:  # 2 micro-batches per optimizer step
            (model(**batch).loss / 2).backward()
        pruned_grad = pruned_values(model)["grad"]
        optimizer.step()  # no reapply(): the gradient hooks alone must keep the pruned weights at zero
        after = pruned_values(model, optimizer)
        optimizer.zero_grad()
        record["steps"].append({"pruned_grad": pruned_grad, "pruned_weight": after["weight"],
                                "pruned_moment": after["moment"], "sparsity": masked_weight_sparsity(model)})
        reapply(model)

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(output_dir / "model.safetensors"))
    if rank == 0:
        save_masks(model, output_dir / "masks")
    dist.barrier()

    # The saved whole weights, read back without FSDP: exact zeros where the masks are False, survivors trained.
    saved = load_file(str(output_dir / "model.safetensors"))
    masks, _ = read_masks(output_dir / "masks")
    record["saved_masks_equal"] = all(torch.equal(masks[name], whole_masks[name]) for name in whole_masks)
    record["saved_pruned_max"] = max(float(saved[f"{name}.weight"][~mask].abs().max()) for name, mask in masks.items())
    initial = tiny_vit().state_dict()
    record["saved_kept_trained"] = all(
        not torch.equal(saved[f"{name}.weight"][mask], initial[f"{name}.weight"][mask]) for name, mask in masks.items()
    )
    record["saved_kept_nonzero"] = min(float((saved[f"{name}.weight"][mask] != 0).float().mean())
                                       for name, mask in masks.items())

    # Loaded whole into a freshly sharded (dense) model: the local shards take the zeros.
    fresh = shard(tiny_vit(seed=1))
    load_masks(fresh, output_dir / "masks")
    record["loaded_pruned_max"] = pruned_values(fresh)["weight"]
    record["loaded_sparsity"] = masked_weight_sparsity(fresh)
    record.update(mixed_sharding_sparsity())
    record["refusals"] = refusals(output_dir)
    (output_dir / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def mixed_sharding_sparsity() -> dict:
    """`masked_weight_sparsity` of a model whose first layer alone is sharded: the unsharded layer's zeros, held whole
    by every rank, must be counted once, not once per rank."""
    model = tiny_vit()
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.6))
    fully_shard(model.vit.layers[0])
    reapply(model)
    kinds = {isinstance(module.weight, DTensor) for module in model.modules() if hasattr(module, "weight_mask")}
    return {"mixed_sharded_and_plain": kinds == {True, False}, "mixed_sparsity": masked_weight_sparsity(model)}


def refusals(output_dir: Path) -> dict[str, str]:
    """The error of `ToSTTrainer` given a model sharded beforehand (it must name what to do instead). FSDP1 needs an
    accelerator device, so its refusal is tested in-process (tests/test_tost_fsdp.py)."""
    from hf_sparse import ToSTTrainer, ToSTTrainingArguments

    messages = {}
    args = ToSTTrainingArguments(output_dir=str(output_dir / "refused"), report_to=[], use_cpu=True)
    try:
        ToSTTrainer(model=shard(tiny_vit()), args=args)
    except ValueError as error:
        messages["trainer_fully_shard"] = str(error)
    return messages


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    {"api": main_api}[mode](directory)
