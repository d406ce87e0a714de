"""Configuration and constants of weight masks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ...validation import check_choice, check_fraction, check_int, check_positive


DEFAULT_PRUNABLE_PATTERNS: tuple[str, ...] = (r"(^|\.)(q_proj|k_proj|v_proj|o_proj|fc1|fc2)$",)
"""The default prunable layers. On a ViT (SparseViT, HF ViT) these regexes select the Linears of every block: the
q/k/v/o projections and the two MLP layers. On a model without such layers (a CNN such as transformers'
`ResNetForImageClassification`) the default is every convolution except the first (the stem) and every Linear except
the last (the classifier), as in the lottery-ticket and pruning-at-initialisation literature. Either way the patch
embedding or stem, the classifier, normalisation layers and all biases stay dense."""

MASK_METHODS: tuple[str, ...] = ("random", "magnitude", "snip", "grasp", "synflow")
MASK_SCOPES: tuple[str, ...] = ("global", "layer")
MASKS_FILENAME = "sparsity_masks.safetensors"
"""Masks are saved beside the weights under this name (see `save_masks`)."""

MASK_BUFFER_NAME = "weight_mask"
"""Each masked layer (`nn.Linear` or convolution) carries its boolean mask as this non-persistent buffer."""


def normalize_patterns(patterns: str | Sequence[str]) -> tuple[str, ...]:
    """Accept one regex or a sequence of them; check they compile."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    if not patterns or not all(isinstance(pattern, str) for pattern in patterns):
        raise ValueError(f"`patterns` must be a regex string or a non-empty sequence of them, got {patterns!r}.")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"`patterns` holds an invalid regex {pattern!r}: {error}") from error
    return patterns


@dataclass
class MaskConfig:
    """How to build a weight mask at initialisation.

    Args:
        method: one of `MASK_METHODS`: "random" (uniform density per layer), "magnitude" (|w|), "snip" (|g * w|),
            "grasp" (w * Hg, see `grasp_scores` for the sign), "synflow" (iterative |w * dR/dw|).
        sparsity: fraction of the prunable weights set to zero, in [0, 1).
        scope: "global" (one threshold over all prunable weights) or "layer" (the same sparsity in each layer).
            "random" is always per layer.
        patterns: regexes (`re.search`) on module names selecting the prunable `nn.Linear` and convolution modules
            (default: `DEFAULT_PRUNABLE_PATTERNS`, the ViT projections or, on a CNN, every convolution after the stem).
        num_batches: batches used by "snip" and "grasp" (gradients are summed over them).
        synflow_rounds: pruning rounds of "synflow" (100 in the paper); the density goes to the target exponentially.
        grasp_temperature: the logits are divided by it in GraSP's default loss (200 in GraSP's code).
        seed: seed of the "random" method (None: the global torch generator).
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = "global"
    patterns: tuple[str, ...] = field(default_factory=lambda: DEFAULT_PRUNABLE_PATTERNS)
    num_batches: int = 1
    synflow_rounds: int = 100
    grasp_temperature: float = 200.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, MASK_METHODS)
        check_fraction("sparsity", self.sparsity)
        check_choice("scope", self.scope, MASK_SCOPES)
        self.patterns = normalize_patterns(self.patterns)
        check_int("num_batches", self.num_batches, minimum=1)
        check_int("synflow_rounds", self.synflow_rounds, minimum=1)
        check_positive("grasp_temperature", self.grasp_temperature)

    def to_metadata(self) -> dict[str, Any]:
        """The fields stored in a mask file's metadata."""
        metadata = asdict(self)
        metadata["target_sparsity"] = metadata.pop("sparsity")
        metadata["patterns"] = list(self.patterns)
        return metadata
