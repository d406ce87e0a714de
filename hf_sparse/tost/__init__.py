"""ToST: training a pruned network better, whatever its mask (Jaiswal et al., ICML 2022).

Order of events: mask (`masks/`: random, magnitude, SNIP, GraSP, SynFlow, lottery ticket) -> identical on every rank
-> rescaled init (`rescaled_init/`: GradInit or 1/sqrt(density)) -> ghosts (`ghosts/`: soft neurons and skip
connections, annealed off and removed) -> masked training with label smoothing (`label_smoothing.py`) -> evaluate the
model's own architecture. `setup.py` runs the first three; `trainer.py` pairs `ToSTTrainingArguments` with
`ToSTTrainer`.
"""

from .arguments import RESCALED_INIT_METHODS, TOST_MASK_METHODS, ToSTTrainingArguments, default_rescaled_init_steps
from .ghosts import (
    GhostActivation,
    GhostActivations,
    GhostCallback,
    GhostSchedule,
    GhostSkips,
    attach_ghost_activations,
    attach_ghost_skips,
    identity_like,
)
from .gradient_flow import GradientFlowCallback
from .label_smoothing import label_smoothing_epsilon, smoothed_cross_entropy
from .masks import (
    DEFAULT_PRUNABLE_PATTERNS,
    MASK_METHODS,
    MASKS_FILENAME,
    MaskCallback,
    MaskConfig,
    WeightMasks,
    apply_masks,
    compute_masks,
    find_prunable_layers,
    find_prunable_linears,
    get_masks,
    grasp_scores,
    iterative_magnitude_pruning,
    load_masks,
    magnitude_scores,
    mask_sparsity,
    masks_from_scores,
    prune_model,
    random_scores,
    read_masks,
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
from .trainer import ToSTTrainer


__all__ = [
    "DEFAULT_PRUNABLE_PATTERNS",
    "MASK_METHODS",
    "MASKS_FILENAME",
    "RESCALED_INIT_METHODS",
    "TOST_MASK_METHODS",
    "GhostActivation",
    "GhostActivations",
    "GhostCallback",
    "GhostSchedule",
    "GhostSkips",
    "GradInitReport",
    "GradientFlowCallback",
    "MaskCallback",
    "MaskConfig",
    "ToSTTrainer",
    "ToSTTrainingArguments",
    "WeightMasks",
    "apply_masks",
    "attach_ghost_activations",
    "attach_ghost_skips",
    "compute_masks",
    "default_rescaled_init_steps",
    "density_rescale",
    "find_prunable_layers",
    "find_prunable_linears",
    "get_masks",
    "gradinit_rescale",
    "grasp_scores",
    "identity_like",
    "iterative_magnitude_pruning",
    "label_smoothing_epsilon",
    "load_masks",
    "magnitude_scores",
    "mask_sparsity",
    "masks_from_scores",
    "prune_model",
    "random_scores",
    "read_masks",
    "reapply",
    "remove_masks",
    "rounds_for_sparsity",
    "save_masks",
    "smoothed_cross_entropy",
    "snip_scores",
    "sparsity_after_rounds",
    "sparsity_report",
    "synflow_masks",
    "synflow_scores",
]
