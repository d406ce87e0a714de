"""ToST's label smoothing: 1 - alpha on the label and alpha / (C - 1) on each other class.

PyTorch's and HF's `label_smoothing` epsilon puts eps / C on every class instead; eps = alpha * C / (C - 1) gives
ToST's targets, so the loss is plain `F.cross_entropy` with that epsilon.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothing_epsilon(alpha: float, num_classes: int) -> float:
    """The PyTorch/HF `label_smoothing` epsilon equal to ToST's alpha: eps / C on every class equals alpha / (C - 1)
    on every wrong class and 1 - alpha on the right one when eps = alpha * C / (C - 1)."""
    if num_classes < 2:
        raise ValueError(f"`label_smoothing` needs at least 2 classes, got {num_classes}.")
    epsilon = alpha * num_classes / (num_classes - 1)
    if epsilon > 1.0:
        raise ValueError(
            f"`label_smoothing` = {alpha} is too large for {num_classes} classes: it must be <= "
            f"{(num_classes - 1) / num_classes:.4f} (the wrong classes would get more mass than the right one)."
        )
    return epsilon


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy against targets with 1 - alpha on the label and alpha / (C - 1) on each other class (labels of
    -100 are ignored). Computed in float32 at least."""
    num_classes = logits.shape[-1]
    epsilon = label_smoothing_epsilon(alpha, num_classes) if alpha > 0 else 0.0
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.reshape(-1, num_classes), labels.to(logits.device).reshape(-1), label_smoothing=epsilon,
        reduction=reduction,
    )
