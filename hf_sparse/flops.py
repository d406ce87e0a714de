"""Theoretical FLOPs of a (Sparse)ViT, to set measured speed-ups beside what the arithmetic allows, and to match the
training FLOPs of one way of dropping tokens with another (PatchDropout against token pruning)."""

from __future__ import annotations

from typing import Protocol

from .models.sparse_vit.configuration_sparse_vit import SparseViTConfig
from .models.sparse_vit.modeling_sparse_vit import keep_count


class RatioSchedule(Protocol):
    """What matching needs of `hf_sparse.tri_level.schedule.KeepRatioSchedule` (not imported: the Tri-Level trainer
    imports this module)."""

    def ratios(self, progress: float, token_keep_ratio: float, attention_keep_ratio: float) -> tuple[float, float]: ...


def token_counts(
    config: SparseViTConfig, token_keep_ratio: float, patch_keep_ratio: float = 1.0
) -> list[tuple[int, int]]:
    """(tokens entering attention, tokens entering the MLP) for every layer. `patch_keep_ratio` < 1: PatchDropout
    keeps that share of the patches before the first layer (a training forward pass)."""
    special = config.num_prefix_tokens
    patches = keep_count(config.num_patches, patch_keep_ratio)
    counts = []
    for index in range(config.num_hidden_layers):
        tokens_in = special + patches
        if index in config.token_pruning_layers and token_keep_ratio < 1.0:
            kept = keep_count(patches, token_keep_ratio)
            if kept < patches:
                if config.token_fusion and special == config.num_prefix_tokens:
                    special += 1
                patches = kept
        counts.append((tokens_in, special + patches))
    return counts


def forward_flops(
    config: SparseViTConfig,
    token_keep_ratio: float = 1.0,
    attention_keep_ratio: float = 1.0,
    patch_keep_ratio: float = 1.0,
) -> float:
    """Multiply-adds x 2 of one image's forward pass, counting masked attention connections as skipped (an ideal
    sparse kernel; fused SDPA with a boolean mask still computes them) and the no-grad selection scores as extra.
    PatchDropout (`patch_keep_ratio` < 1) drops patches after the embedding: the patch embedding runs on all."""
    hidden, inner = config.hidden_size, config.intermediate_size
    channels_x_patch = config.num_channels * _area(config.patch_size)
    flops = 2.0 * config.num_patches * hidden * channels_x_patch  # patch embedding
    connection_fraction = 1.0
    for index, (tokens_in, tokens_out) in enumerate(token_counts(config, token_keep_ratio, patch_keep_ratio)):
        flops += 2.0 * tokens_in * hidden * hidden * 4  # q, k, v, o projections
        flops += 2.0 * 2 * tokens_in * tokens_in * hidden * connection_fraction  # scores and weighted values
        flops += 2.0 * 2 * tokens_out * hidden * inner  # MLP
        if index in config.token_pruning_layers:
            if token_keep_ratio < 1.0:
                flops += 2.0 * tokens_in * hidden  # CLS query against every key
            if attention_keep_ratio < 1.0:
                flops += 2.0 * tokens_out * tokens_out * hidden  # queries x keys among kept tokens
                connection_fraction = attention_keep_ratio
    flops += 2.0 * hidden * max(config.num_labels, 1)
    return flops


def training_flops(
    config: SparseViTConfig,
    token_keep_ratio: float = 1.0,
    attention_keep_ratio: float = 1.0,
    patch_keep_ratio: float = 1.0,
) -> float:
    """Forward + backward (about twice the forward)."""
    return 3.0 * forward_flops(config, token_keep_ratio, attention_keep_ratio, patch_keep_ratio)


def matched_patch_dropout_keep_ratio(config: SparseViTConfig, token_keep_ratio: float,
                                     schedule: RatioSchedule | None = None) -> float:
    """The PatchDropout keep ratio whose training FLOPs come closest to those of token pruning at `token_keep_ratio`
    at `config.token_pruning_layers` (CLS scores included), for `config`'s geometry; on a tie, the fewer patches.
    Returned as `kept / num_patches`, so that `keep_count` gives back exactly `kept`.

    Without `schedule`, the target is the final ratio's cost per step. With the `KeepRatioSchedule` a Tri-Level run
    follows (dense warm-up, then a cosine down to the final ratio), it is the run's mean cost per step, so that a
    constant PatchDropout run (as timm's) trains with the same FLOPs as the whole token-pruning run.

    For the 6-layer demo ViT (hidden 96, 49 patches), keep 0.5 at layers 1, 3, 4 costs 0.484 of dense: PatchDropout
    keeping 24 of 49 patches (0.49) costs 0.481; over the default schedule (dense for 1/30, a cosine over 1/3) the
    run costs 0.58 of dense on average, matched by keeping 29 of 49 (0.59)."""
    num_patches = config.num_patches
    if schedule is None:
        target = training_flops(config, token_keep_ratio)
    else:  # the mean over the run: midpoints of 1,000 equal slices of its progress
        points = 1000
        target = sum(training_flops(config, schedule.ratios((i + 0.5) / points, token_keep_ratio, 1.0)[0])
                     for i in range(points)) / points
    kept = min(range(1, num_patches + 1),
               key=lambda count: (abs(training_flops(config, patch_keep_ratio=count / num_patches) - target), count))
    return kept / num_patches


def _area(size: int | list[int]) -> int:
    return size * size if isinstance(size, int) else int(size[0]) * int(size[1])
