"""Ghost neurons and ghost skip connections: training-time helpers that vanish before evaluation (ToST)."""

from .callback import GhostCallback
from .schedule import GhostSchedule
from .skip_connections import (
    GHOST_SKIP_SCHEDULES,
    GhostSkips,
    attach_ghost_skips,
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
    "DEFAULT_GHOST_MLP_PATTERN",
    "GHOST_ACTIVATION_KINDS",
    "GHOST_SKIP_SCHEDULES",
    "GhostActivation",
    "GhostActivations",
    "GhostCallback",
    "GhostSchedule",
    "GhostSkips",
    "attach_ghost_activations",
    "attach_ghost_skips",
    "ghost_skip_alpha",
    "identity_like",
    "identity_like_feature_map",
    "infer_activation_kind",
]
