"""Theoretical FLOPs of a (Sparse)ViT, to set measured speed-ups beside what the arithmetic allows, and to match the
training FLOPs of one way of dropping tokens with another (PatchDropout against token pruning)."""

from __future__ import annotations

from .models.sparse_vit.configuration_sparse_vit import SparseViTConfig
from .models.sparse_vit.modeling_sparse_vit import keep_count


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


def matched_patch_dropout_keep_ratio(config: SparseViTConfig, token_keep_ratio: float) -> float:
    """The PatchDropout keep ratio whose training FLOPs come closest to those of token pruning at `token_keep_ratio`
    at `config.token_pruning_layers` (the final ratio, CLS scores included), for `config`'s geometry; on a tie, the
    fewer patches. Returned as `kept / num_patches`, so that `keep_count` gives back exactly `kept`.

    For the 6-layer demo ViT (hidden 96, 49 patches), keep 0.5 at layers 1, 3, 4 costs 0.484 of dense: PatchDropout
    keeping 24 of 49 patches (0.49) costs 0.481. Dropping after layer 0's attention instead (a pruning layer at 0), a
    keep ratio of 0.43 costs about the same (0.479): the embedding is earlier, so it keeps more."""
    num_patches = config.num_patches
    target = training_flops(config, token_keep_ratio)
    kept = min(range(1, num_patches + 1),
               key=lambda count: (abs(training_flops(config, patch_keep_ratio=count / num_patches) - target), count))
    return kept / num_patches


def _area(size: int | list[int]) -> int:
    return size * size if isinstance(size, int) else int(size[0]) * int(size[1])
