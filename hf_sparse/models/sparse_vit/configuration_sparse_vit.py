"""SparseViT configuration: every ViT field, plus token (level 2) and attention (level 3) sparsity, and the random
alternatives a user already has (random token selection, PatchDropout) to measure the levels against."""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig


TOKEN_SELECTIONS = ("cls_attention", "random")

AUTO_MAP = {
    "AutoConfig": "configuration_sparse_vit.SparseViTConfig",
    "AutoModel": "modeling_sparse_vit.SparseViTModel",
    "AutoModelForImageClassification": "modeling_sparse_vit.SparseViTForImageClassification",
}


def default_token_pruning_layers(num_hidden_layers: int) -> list[int]:
    """The paper prunes after blocks 3, 6 and 9 of 12; scale those positions (1/4, 2/4, 3/4) to the depth."""
    layers = sorted({math.floor(quarter * num_hidden_layers / 4) for quarter in (1, 2, 3)})
    return [layer for layer in layers if 0 <= layer < num_hidden_layers]


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1] (1.0 turns it off), got {value!r}.")
    return float(value)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class SparseViTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SparseViTModel`]. The ViT fields mean what they mean in `transformers.ViTConfig`; the
    sparsity fields implement levels 2 and 3 of Tri-Level E-ViT.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, hidden_dropout_prob,
        attention_probs_dropout_prob, initializer_range, layer_norm_eps, image_size, patch_size, num_channels,
        qkv_bias, encoder_stride, pooler_output_size, pooler_act:
            As in `ViTConfig` (note HF ViT's `layer_norm_eps` default of 1e-12, not timm's 1e-6).
        use_distillation_token (`bool`, defaults to `False`):
            Add DeiT's distillation token (a second prefix token after CLS).
        token_keep_ratio (`float`, defaults to 1.0):
            Fraction of the patch tokens kept at each pruning layer, ranked by the CLS attention they receive.
            Ratios compound: 0.7 keeps 196 -> 138 -> 97 -> 68 patches over three pruning layers. 1.0 turns it off.
        token_pruning_layers (`list[int]`, *optional*):
            0-based indices of the pruning layers, strictly increasing. Defaults to 1/4, 2/4 and 3/4 of the depth
            (3, 6, 9 for 12 layers, as in the paper).
        token_selection (`str`, defaults to `"cls_attention"`):
            Which patch tokens a pruning layer keeps, in training: `"cls_attention"` the most attended by CLS
            (head-averaged; EViT, the paper), `"random"` a uniform random subset of the same size at the same layers
            (the control: drawn from torch's global RNG, which the Trainer seeds). Evaluation (`model.eval()`) always
            ranks by CLS attention, so a model trained with random selection is evaluated, pruned, exactly as a
            CLS-trained one is: deterministic, and the inference a user would deploy
            (`set_sparsity(token_keep_ratio=1.0)` evaluates either with all tokens).
        token_fusion (`bool`, defaults to `False`):
            Fuse the dropped tokens into one extra token, their average weighted by CLS attention (EViT), instead of
            dropping them (the paper). With `token_selection="random"`, the random subset is kept and the rest fused.
        patch_dropout_keep_ratio (`float`, defaults to 1.0):
            PatchDropout (Liu et al., WACV 2023; timm's `patch_drop_rate` is 1 minus this): in training only, each
            image keeps a uniform random `ceil(n * patch_dropout_keep_ratio)` of its n patch tokens, once, right after
            the embedding (position embeddings added; the prefix tokens always kept). Evaluation sees every patch (as
            in timm); to evaluate pruned, use the token level at inference (`set_sparsity(token_keep_ratio=...)`).
            `hf_sparse.flops.matched_patch_dropout_keep_ratio` gives the ratio with the training FLOPs of a token
            pruning setting (of its final ratio, or of a whole run on its keep-ratio schedule). 1.0 turns it off.
        attention_keep_ratio (`float`, defaults to 1.0):
            Fraction of the patch keys each patch query keeps, chosen at each pruning layer and applied in the
            following layers. Prefix and fused tokens are always kept as rows and columns. 1.0 turns it off.
    """

    model_type = "sparse_vit"
    _auto_class = "AutoConfig"  # saved with its code and `auto_map`, for Hub users without hf_sparse
    # Outputs that are not logits: the Trainer leaves them out of `EvalPrediction.predictions` (so predictions are the
    # logits, as with HF ViT); calling the model, or `trainer.predict(..., ignore_keys=[])`, still returns them.
    keys_to_ignore_at_inference = ["kept_patch_indices", "cls_attention_variance"]

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        image_size: int | list[int] = 224,
        patch_size: int | list[int] = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        encoder_stride: int = 16,
        pooler_output_size: int | None = None,
        pooler_act: str = "tanh",
        use_distillation_token: bool = False,
        token_keep_ratio: float = 1.0,
        token_pruning_layers: list[int] | None = None,
        token_fusion: bool = False,
        attention_keep_ratio: float = 1.0,
        token_selection: str = "cls_attention",
        patch_dropout_keep_ratio: float = 1.0,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = list(image_size) if isinstance(image_size, (list, tuple)) else image_size
        self.patch_size = list(patch_size) if isinstance(patch_size, (list, tuple)) else patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.encoder_stride = encoder_stride
        self.pooler_output_size = pooler_output_size if pooler_output_size else hidden_size
        self.pooler_act = pooler_act
        self.use_distillation_token = use_distillation_token
        self.token_keep_ratio = token_keep_ratio
        self.token_pruning_layers = (
            list(token_pruning_layers)
            if token_pruning_layers is not None
            else default_token_pruning_layers(num_hidden_layers)
            if isinstance(num_hidden_layers, int)
            else None
        )
        self.token_fusion = token_fusion
        self.attention_keep_ratio = attention_keep_ratio
        self.token_selection = token_selection
        self.patch_dropout_keep_ratio = patch_dropout_keep_ratio
        self._validate_sparse_vit_fields()
        # Hub users without hf_sparse load through remote code: name all three Auto classes (transformers writes
        # only the saved class's own key).
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS, plus DeiT's distillation token when present."""
        return 2 if self.use_distillation_token else 1

    @property
    def num_patches(self) -> int:
        image_height, image_width = _pair(self.image_size)
        patch_height, patch_width = _pair(self.patch_size)
        return (image_height // patch_height) * (image_width // patch_width)

    def _validate_sparse_vit_fields(self) -> None:
        """Fail at construction, naming the field, rather than halfway through training."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"):
            _check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be a positive number, got {self.layer_norm_eps!r}.")
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            if len(values) not in (1, 2):
                raise ValueError(f"`{name}` must be an int or a [height, width] pair, got {value!r}.")
            for item in values:
                _check_positive_int(name, item)
        if any(p > i for p, i in zip(_pair(self.patch_size), _pair(self.image_size))):
            raise ValueError(f"`patch_size` {self.patch_size} must not exceed `image_size` {self.image_size}.")
        if any(i % p for p, i in zip(_pair(self.patch_size), _pair(self.image_size))):
            raise ValueError(
                f"`patch_size` {self.patch_size} must divide `image_size` {self.image_size}: the border pixels would "
                "silently be dropped."
            )
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")
        self.token_keep_ratio = _check_ratio("token_keep_ratio", self.token_keep_ratio)
        self.attention_keep_ratio = _check_ratio("attention_keep_ratio", self.attention_keep_ratio)
        self.patch_dropout_keep_ratio = _check_ratio("patch_dropout_keep_ratio", self.patch_dropout_keep_ratio)
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(
                f"`token_selection` must be one of {list(TOKEN_SELECTIONS)}, got {self.token_selection!r}."
            )
        if not isinstance(self.token_fusion, bool):
            raise ValueError(f"`token_fusion` must be a bool, got {self.token_fusion!r}.")
        if not isinstance(self.use_distillation_token, bool):
            raise ValueError(f"`use_distillation_token` must be a bool, got {self.use_distillation_token!r}.")
        layers = self.token_pruning_layers
        if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"`token_pruning_layers` must be a list of layer indices, got {layers!r}.")
        if any(not 0 <= i < self.num_hidden_layers for i in layers):
            raise ValueError(
                f"`token_pruning_layers` must hold indices in [0, {self.num_hidden_layers - 1}] "
                f"(num_hidden_layers={self.num_hidden_layers}), got {layers!r}."
            )
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"`token_pruning_layers` must be strictly increasing, got {layers!r}.")


__all__ = ["TOKEN_SELECTIONS", "SparseViTConfig", "default_token_pruning_layers"]
