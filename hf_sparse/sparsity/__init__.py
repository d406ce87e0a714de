"""Training pruned networks better (ToST): weight masks, ghost neurons and skips, rescaled initialisation.

Order of events (see the ToST digest): mask (`prune_model` / `iterative_magnitude_pruning`) -> rescaled init
(`gradinit_rescale` or `density_rescale`) -> ghosts (`attach_ghost_activations`, `attach_ghost_skips`, driven by a
`GhostSchedule`) -> masked training (`reapply` after each optimizer step) -> ghosts removed -> evaluate.
"""

from .ghosts import (
    GhostActivation,
    GhostActivations,
    GhostSchedule,
    GhostSkips,
    attach_ghost_activations,
    attach_ghost_skips,
    identity_like,
)
from .masks import (
    DEFAULT_PRUNABLE_PATTERNS,
    MASK_METHODS,
    MASKS_FILENAME,
    MaskConfig,
    WeightMasks,
    apply_masks,
    compute_masks,
    find_prunable_linears,
    get_masks,
    grasp_scores,
    iterative_magnitude_pruning,
    load_masks,
    magnitude_scores,
    masks_from_scores,
    prune_model,
    random_scores,
    reapply,
    remove_masks,
    rounds_for_sparsity,
    save_masks,
    snip_scores,
    sparsity_after_rounds,
    sparsity_report,
    synflow_masks,
    synflow_scores,
)
from .rescaled_init import GradInitReport, density_rescale, gradinit_rescale


__all__ = [
    "DEFAULT_PRUNABLE_PATTERNS",
    "MASK_METHODS",
    "MASKS_FILENAME",
    "GhostActivation",
    "GhostActivations",
    "GhostSchedule",
    "GhostSkips",
    "GradInitReport",
    "MaskConfig",
    "WeightMasks",
    "apply_masks",
    "attach_ghost_activations",
    "attach_ghost_skips",
    "compute_masks",
    "density_rescale",
    "find_prunable_linears",
    "get_masks",
    "gradinit_rescale",
    "grasp_scores",
    "identity_like",
    "iterative_magnitude_pruning",
    "load_masks",
    "magnitude_scores",
    "masks_from_scores",
    "prune_model",
    "random_scores",
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
