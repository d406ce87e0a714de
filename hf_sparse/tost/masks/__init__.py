"""Unstructured weight masks for the Linear and convolution layers of a model (ViT and CNN defaults).

Typical use::

    from hf_sparse.tost.masks import MaskConfig, prune_model, reapply

    masks = prune_model(model, MaskConfig(method="snip", sparsity=0.9), batches=train_batches)
    ...  # after every optimizer step:
    masks.reapply()
    masks.save(output_dir)  # -> output_dir/sparsity_masks.safetensors
"""

from .callback import MaskCallback
from .config import (
    DEFAULT_PRUNABLE_PATTERNS,
    MASK_BUFFER_NAME,
    MASK_METHODS,
    MASK_SCOPES,
    MASKS_FILENAME,
    MaskConfig,
)
from .lottery_ticket import (
    REWIND_MODES,
    iterative_magnitude_pruning,
    rounds_for_sparsity,
    sparsity_after_rounds,
)
from .model import (
    PRUNABLE_TYPES,
    WeightMasks,
    apply_masks,
    find_prunable_layers,
    find_prunable_linears,
    get_masks,
    load_masks,
    masked_modules,
    masked_weight_sparsity,
    model_family,
    reapply,
    remove_masks,
    save_masks,
    sparsity_report,
)
from .pruning import compute_masks, prune_model
from .scores import (
    grasp_scores,
    magnitude_scores,
    masks_from_scores,
    random_scores,
    snip_scores,
    synflow_masks,
    synflow_scores,
)
from .serialization import mask_sparsity, read_masks


__all__ = [
    "DEFAULT_PRUNABLE_PATTERNS",
    "MASK_BUFFER_NAME",
    "MASK_METHODS",
    "MASK_SCOPES",
    "MASKS_FILENAME",
    "PRUNABLE_TYPES",
    "REWIND_MODES",
    "MaskCallback",
    "MaskConfig",
    "WeightMasks",
    "apply_masks",
    "compute_masks",
    "find_prunable_layers",
    "find_prunable_linears",
    "get_masks",
    "grasp_scores",
    "iterative_magnitude_pruning",
    "load_masks",
    "magnitude_scores",
    "mask_sparsity",
    "masked_modules",
    "masked_weight_sparsity",
    "masks_from_scores",
    "model_family",
    "prune_model",
    "random_scores",
    "read_masks",
    "reapply",
    "remove_masks",
    "rounds_for_sparsity",
    "save_masks",
    "snip_scores",
    "sparsity_after_rounds",
    "sparsity_report",
    "synflow_masks",
    "synflow_scores",
]
