"""Ghost neurons and ghost skip connections: training-time helpers that vanish before evaluation (ToST)."""

from .callback import GHOST_BRANCHES_FILENAME, GhostCallback
from .schedule import GhostSchedule
from .skip_connections import (
    GHOST_BRANCH_INIT,
    GHOST_SKIP_SCHEDULES,
    ConvGhostBranches,
    GhostBranch,
    GhostSkips,
    attach_ghost_skips,
    ghost_branch_convolutions,
    ghost_skip_alpha,
    identity_like,
    identity_like_feature_map,
)
from .soft_neurons import (
    DEFAULT_GHOST_MLP_PATTERN,
    GHOST_ACTIVATION_KINDS,
    GhostActivation,
    GhostActivations,
    attach_ghost_activations,
    infer_activation_kind,
)


__all__ = [
    "ConvGhostBranches",
    "DEFAULT_GHOST_MLP_PATTERN",
    "GHOST_BRANCHES_FILENAME",
    "GHOST_BRANCH_INIT",
    "GHOST_ACTIVATION_KINDS",
    "GHOST_SKIP_SCHEDULES",
    "GhostActivation",
    "GhostActivations",
    "GhostBranch",
    "GhostCallback",
    "GhostSchedule",
    "GhostSkips",
    "attach_ghost_activations",
    "attach_ghost_skips",
    "ghost_branch_convolutions",
    "ghost_skip_alpha",
    "identity_like",
    "identity_like_feature_map",
    "infer_activation_kind",
]
