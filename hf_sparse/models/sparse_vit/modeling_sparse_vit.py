"""PyTorch SparseViT: a ViT whose patch tokens (level 2) and attention connections (level 3) can be pruned.

Self-contained (only `from .x import` inside this folder and public transformers API), so the folder can be shipped
to the Hub as remote code.

Token and attention sparsity happen in the pruning layers (`config.token_pruning_layers`), after the attention
residual and before the MLP:
  * level 2 keeps the prefix tokens plus the `ceil(n * token_keep_ratio)` patch tokens that receive the most
    head-averaged CLS attention (optionally fusing the rest into one token); with `token_selection="random"`, a
    uniform random subset of that size in training (the control), CLS attention in evaluation;
  * level 3 keeps, for each remaining patch query, the `ceil(k * attention_keep_ratio)` patch keys with the most
    head-averaged attention, and applies that boolean mask in the following layers up to and including the next
    pruning layer's attention. Prefix and fused tokens always keep their rows and columns.
Selection scores come from a separate no-grad computation on this layer's queries and keys, softmaxed without any
mask in force, in float32, so the main attention stays a fused SDPA call and an earlier mask cannot create ties.

PatchDropout (`patch_dropout_keep_ratio` < 1, training only) keeps a uniform random subset of the patch tokens once,
right after the embedding; the encoder then starts from those patches (their original indices travel with them).
Every keep count is `keep_count(n, ratio)` of a ratio the config or `set_sparsity` sets, so random selection adds no
value that `torch.compile` would specialise on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_sparse_vit import SparseViTConfig, _check_ratio, _pair


logger = logging.get_logger(__name__)


try:  # torch >= 2.5; transformers offers "flex_attention" only where it exists
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = create_block_mask = flex_attention = None


@dataclass
class SparseViTModelOutput(BaseModelOutputWithPooling):
    r"""
    kept_patch_indices (`tuple(torch.LongTensor)`, *optional*):
        For each pruning layer that dropped tokens, the original indices (0-based, row-major over the patch grid) of
        the patch tokens kept after it, shape `(batch_size, kept_patches)`. PatchDropout's drop before the encoder
        is not listed (it is no pruning layer), but the indices after it are still the original ones.
    cls_attention_variance (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
        Variance over the patch keys of the last layer's head-averaged CLS attention (returned when
        `output_cls_attention_variance=True`; used to break ties in example pruning).
    """

    kept_patch_indices: tuple[torch.LongTensor, ...] | None = None
    cls_attention_variance: torch.FloatTensor | None = None


@dataclass
class SparseViTImageClassifierOutput(ImageClassifierOutput):
    r"""
    kept_patch_indices, cls_attention_variance: see [`SparseViTModelOutput`].
    """

    kept_patch_indices: tuple[torch.LongTensor, ...] | None = None
    cls_attention_variance: torch.FloatTensor | None = None


@dataclass
class TokenState:
    """What the layers after a pruning layer need to know about the current token sequence."""

    patch_ids: torch.LongTensor  # (batch, patches): original index of each remaining patch token
    num_special_tokens: int  # prefix tokens, plus one once a fused token exists
    attention_mask: torch.BoolTensor | None = None  # (batch, 1, tokens, tokens), True = attend
    block_mask: BlockMask | None = None  # `attention_mask` for FlexAttention: see `flex_block_mask`

    def flex_block_mask(self) -> BlockMask:
        """`attention_mask` as FlexAttention's block mask. Built by the first layer that runs flex with this mask and
        reused by the following ones up to the next pruning layer: one build per mask, none where flex never runs."""
        if self.block_mask is None:
            self.block_mask = connection_block_mask(self.attention_mask)
        return self.block_mask


@dataclass
class SparsityRatios:
    """The keep ratios in force: one object, shared by the encoder (which reads it in `forward`) and its sparsifiers
    (which show it in `print(model)`). `set_sparsity` changes it; under `torch.compile` each distinct pair is a graph."""

    token_keep_ratio: float
    attention_keep_ratio: float


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's RGB -> "L" conversion


def keep_count(total: int, ratio: float) -> int:
    """`ceil(total * ratio)`, robust to float noise (0.7 * 100 is 70.00000000000001), and at least 1."""
    return max(1, math.ceil(round(total * ratio, 6)))


def random_patch_positions(batch_size: int, num_patches: int, kept: int, device: torch.device) -> torch.LongTensor:
    """A uniform random subset of `kept` of `num_patches` positions per image, in increasing order, `(batch, kept)`.
    Drawn from torch's global RNG (seeded by the Trainer; restored by gradient checkpointing when it recomputes)."""
    return torch.rand(batch_size, num_patches, device=device).topk(kept, dim=1).indices.sort(dim=1).values


class SparseViTPatchEmbeddings(nn.Module):
    """Turns `pixel_values` `(batch, channels, height, width)` into patch embeddings `(batch, patches, hidden)`."""

    def __init__(self, config: SparseViTConfig):
        super().__init__()
        image_size = _pair(config.image_size)
        patch_size = _pair(config.patch_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = config.num_channels
        self.num_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.num_channels == 1 and pixel_values.shape[1] == 3:
            # Image pipelines convert every input to RGB: take the luma, as PIL's "L" mode does (for grey images
            # stored as RGB this is exact; the normalisation is per channel and linear, so it commutes). In training
            # it is more likely a data set of the wrong kind: say it once (not from inside a compiled graph).
            if self.training and not torch.compiler.is_compiling():
                logger.warning_once(
                    "This SparseViT has `num_channels`=1 and is training on 3-channel `pixel_values`: it takes their "
                    "luma (0.299 R + 0.587 G + 0.114 B). Convert the images to grey (mode 'L') in the transform if "
                    "that is not what you want."
                )
            luma = pixel_values.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
            pixel_values = (pixel_values * luma).sum(dim=1, keepdim=True)
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects `num_channels`="
                f"{self.num_channels}."
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class SparseViTEmbeddings(nn.Module):
    """CLS token (plus DeiT's distillation token), patch embeddings and position embeddings."""

    def __init__(self, config: SparseViTConfig):
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        )
        self.patch_embeddings = SparseViTPatchEmbeddings(config)
        num_positions = self.patch_embeddings.num_patches + self.num_prefix_tokens
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = self.patch_embeddings.patch_size
        self.image_size = self.patch_embeddings.image_size

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bicubic interpolation of the patch position embeddings to another image size (as HF ViT does)."""
        num_patches = embeddings.shape[1] - self.num_prefix_tokens
        num_positions = self.position_embeddings.shape[1] - self.num_prefix_tokens
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        prefix_positions = self.position_embeddings[:, : self.num_prefix_tokens]
        patch_positions = self.position_embeddings[:, self.num_prefix_tokens :]
        dim = embeddings.shape[-1]
        side = int(num_positions**0.5)
        patch_positions = patch_positions.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_positions = nn.functional.interpolate(
            patch_positions,
            size=(height // self.patch_size[0], width // self.patch_size[1]),
            mode="bicubic",
            align_corners=False,
        )
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((prefix_positions, patch_positions), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)
        prefix = [self.cls_token.expand(batch_size, -1, -1)]
        if self.distillation_token is not None:
            prefix.append(self.distillation_token.expand(batch_size, -1, -1))
        embeddings = torch.cat((*prefix, embeddings), dim=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            if (height, width) != tuple(self.image_size):
                raise ValueError(
                    f"Input image size ({height}*{width}) doesn't match model ({self.image_size[0]}*"
                    f"{self.image_size[1]}); pass `interpolate_pos_encoding=True` to interpolate the position embeddings."
                )
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


class SparseViTPatchDropout(nn.Module):
    """PatchDropout (Liu et al., WACV 2023; timm's `patch_drop_rate`): in training, each image keeps a uniform random
    `keep_count(patches, patch_dropout_keep_ratio)` of its patch tokens and every prefix token; in evaluation, all.
    Has no parameters."""

    def __init__(self, config: SparseViTConfig):
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.keep_ratio = config.patch_dropout_keep_ratio

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio:g} (training only)"

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """(the embeddings kept, the original indices of the patches kept `(batch, kept)`, None when all are)."""
        num_patches = embeddings.shape[1] - self.num_prefix_tokens
        kept = keep_count(num_patches, self.keep_ratio)
        if not self.training or kept >= num_patches:
            return embeddings, None
        patch_ids = random_patch_positions(embeddings.shape[0], num_patches, kept, embeddings.device)
        index = patch_ids.unsqueeze(-1).expand(-1, -1, embeddings.shape[-1])
        patches = embeddings[:, self.num_prefix_tokens :].gather(1, index)
        return torch.cat((embeddings[:, : self.num_prefix_tokens], patches), dim=1), patch_ids


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention; a boolean `attention_mask` (True = attend) gives exactly zero probability elsewhere."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, float("-inf"))
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def connection_block_mask(attention_mask: torch.BoolTensor) -> BlockMask:
    """FlexAttention's block mask for a boolean `(batch, 1, queries, keys)` connection mask (True = attend).

    transformers' own flex integration adds a tensor mask to the scores (a boolean one would add 0/1), so the
    connection mask becomes a `mask_mod` that reads it; blocks without any kept connection are skipped.
    """
    batch_size, _, query_length, key_length = attention_mask.shape
    last_query, last_key = query_length - 1, key_length - 1

    def mask_mod(batch, head, query_index, key_index):
        # The kernel may evaluate the padding of a partial block; clamping keeps the read inside the tensor, and
        # those positions are dropped whatever the mask says.
        return attention_mask[batch, 0, query_index.clamp(max=last_query), key_index.clamp(max=last_key)]

    return create_block_mask(mask_mod, batch_size, None, query_length, key_length, device=attention_mask.device)


_compiled_flex_attention = None


def _flex_attention_kernel(device: torch.device) -> Callable:
    """`flex_attention` is fused only when compiled: inside a compiled model the model's compile does it; in an eager
    model on an accelerator it is compiled once on its own (as transformers does). On CPU the eager, unfused
    reference runs (a compile costs tens of seconds there and saves nothing at test sizes)."""
    global _compiled_flex_attention
    if torch.compiler.is_compiling() or device.type == "cpu":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.BoolTensor | None,
    scaling: float,
    dropout: float = 0.0,
    token_state: TokenState | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """FlexAttention with the boolean connection mask as a block mask: attention sparsity keeps a fused kernel.

    The block mask comes from `token_state` (whose `attention_mask` is the one given), built once per mask and shared
    by the layers that apply it; without a state it is built here.

    SDPA runs instead, with the same mask and result, where flex adds nothing or cannot run: without a connection
    mask (SDPA's flash kernel is fused already, and a layer then compiles no flex kernel of its own), with attention
    dropout (flex has none), and with gradients on CPU (flex has no CPU backward).
    """
    if attention_mask is None or dropout > 0.0 or (query.device.type == "cpu" and query.requires_grad):
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    block_mask = token_state.flex_block_mask() if token_state is not None else connection_block_mask(attention_mask)
    attn_output = _flex_attention_kernel(query.device)(query, key, value, block_mask=block_mask, scale=scaling)
    return attn_output.transpose(1, 2).contiguous(), None


def _refuse_flash_with_connection_mask(implementation: str, attention_keep_ratio: float | None = None) -> None:
    """Flash attention takes a padding mask at most, never an arbitrary boolean one: refuse, never drop the mask.
    `attention_keep_ratio` None: a connection mask is in force (from a ratio set at run time)."""
    if "flash" not in implementation or (attention_keep_ratio is not None and attention_keep_ratio >= 1.0):
        return
    in_force = "< 1.0" if attention_keep_ratio is None else f"={attention_keep_ratio}"
    raise ValueError(
        f"`attn_implementation`={implementation!r} cannot apply attention sparsity (`attention_keep_ratio`"
        f"{in_force}): flash attention takes no per-connection mask. Use attn_implementation='flex_attention' "
        "(fused, the mask as a block mask), 'sdpa' or 'eager', or keep `attention_keep_ratio`=1.0 (token sparsity "
        "alone works with flash attention)."
    )


class SparseViTAttention(nn.Module):
    """Multi-head self-attention. Also returns its queries and keys, from which the pruning layer ranks tokens."""

    def __init__(self, config: SparseViTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False  # SDPA would assume causal otherwise
        inner_size = self.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, inner_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, inner_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner_size, config.hidden_size)
        _refuse_flash_with_connection_mask(str(config._attn_implementation), config.attention_keep_ratio)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.BoolTensor | None = None,
        output_attentions: bool = False,
        token_state: TokenState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`token_state`: the state whose `attention_mask` is given, so that FlexAttention reuses its block mask."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        # Attention maps exist only in the eager implementation: use it for calls that ask for them.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        if attention_mask is not None:  # a ratio set at run time (`set_sparsity`) is only known here
            _refuse_flash_with_connection_mask(implementation)
        flex_kwargs = {}
        if implementation == "flex_attention":  # ours: transformers' would misread the boolean connection mask
            attention_interface: Callable = flex_attention_forward
            flex_kwargs = {"token_state": token_state}
        elif hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # newer 5.x; 5.0 has none (remote code runs on both)
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        elif implementation == "eager":  # no "eager" key: eager is this file's own function
            attention_interface = eager_attention_forward
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **flex_kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights, query_states, key_states


class SparseViTMLP(nn.Module):
    def __init__(self, config: SparseViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


def float32_scores(device: torch.device) -> torch.autocast:
    """A context in which selection scores are computed in float32. Under autocast, a matmul of `.float()` inputs is
    still cast to bf16/fp16: the rounding ties scores and changes which tokens and connections are kept."""
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def cls_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-averaged attention of the CLS query over all keys, `(batch, tokens)`, float32, no mask in force."""
    with float32_scores(query.device):
        logits = torch.matmul(query[:, :, :1].float(), key.float().transpose(2, 3)) * scaling
        return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


class SparseViTTokenSparsifier(nn.Module):
    """Levels 2 and 3 of Tri-Level E-ViT, applied in a pruning layer; has no parameters. `ratios` are the encoder's
    ratios in force (shown by `print(model)`; the encoder passes them to `forward`)."""

    def __init__(self, config: SparseViTConfig, ratios: SparsityRatios | None = None):
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.token_selection = config.token_selection
        self.token_fusion = config.token_fusion
        self.scaling = (config.hidden_size // config.num_attention_heads) ** -0.5
        self.ratios = ratios if ratios is not None else SparsityRatios(
            config.token_keep_ratio, config.attention_keep_ratio
        )

    def extra_repr(self) -> str:
        text = (
            f"token_keep_ratio={self.ratios.token_keep_ratio:g}, "
            f"attention_keep_ratio={self.ratios.attention_keep_ratio:g}, token_fusion={self.token_fusion}"
        )
        # the selection only when it is not the paper's, so a CLS-attention model prints as it always did
        return text if self.token_selection == "cls_attention" else f"{text}, token_selection={self.token_selection}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        state: TokenState,
        token_keep_ratio: float,
        attention_keep_ratio: float,
    ) -> tuple[torch.Tensor, TokenState]:
        num_special = previous_special = state.num_special_tokens
        num_patches = hidden_states.shape[1] - num_special
        kept = keep_count(num_patches, token_keep_ratio)
        kept_positions = None  # indices into the current patch tokens, (batch, kept)
        if kept < num_patches:
            # Random selection is the training-time control; evaluation ranks by CLS attention (see the config).
            random_selection = self.token_selection == "random" and self.training
            # Random selection needs no scores, unless fusion weighs the dropped tokens by them.
            scores = cls_attention(query, key, self.scaling) if self.token_fusion or not random_selection else None
            if random_selection:
                kept_positions = random_patch_positions(hidden_states.shape[0], num_patches, kept, hidden_states.device)
            else:
                kept_positions = scores[:, num_special:].topk(kept, dim=1).indices.sort(dim=1).values
            hidden_states, num_special = self._select_tokens(hidden_states, scores, kept_positions, num_special)
            state = TokenState(patch_ids=state.patch_ids.gather(1, kept_positions), num_special_tokens=num_special)
        else:
            state = TokenState(patch_ids=state.patch_ids, num_special_tokens=num_special)
        if attention_keep_ratio < 1.0:
            state.attention_mask = self._connection_mask(
                query, key, previous_special, kept_positions, num_special, attention_keep_ratio
            )
        return hidden_states, state

    def _select_tokens(
        self, hidden_states: torch.Tensor, scores: torch.Tensor | None, kept_positions: torch.Tensor, num_special: int
    ) -> tuple[torch.Tensor, int]:
        patches = hidden_states[:, num_special:]
        index = kept_positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
        kept_patches = patches.gather(1, index)
        if not self.token_fusion:
            return torch.cat((hidden_states[:, :num_special], kept_patches), dim=1), num_special
        # EViT-style fusion: one token, the CLS-attention-weighted mean of the dropped patches and of the previous
        # fused token (if any), so there is never more than one fused token.
        weights = scores[:, num_special:].scatter(1, kept_positions, 0.0).to(hidden_states.dtype)
        fused = torch.einsum("bn,bnd->bd", weights, patches)
        total = weights.sum(dim=1)
        if num_special > self.num_prefix_tokens:
            previous_weight = scores[:, self.num_prefix_tokens].to(hidden_states.dtype)
            fused = fused + previous_weight[:, None] * hidden_states[:, self.num_prefix_tokens]
            total = total + previous_weight
        fused = (fused / total.clamp_min(torch.finfo(total.dtype).tiny)[:, None]).unsqueeze(1)
        prefix = hidden_states[:, : self.num_prefix_tokens]
        return torch.cat((prefix, fused, kept_patches), dim=1), self.num_prefix_tokens + 1

    @torch.no_grad()
    def _connection_mask(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        previous_special: int,
        kept_positions: torch.Tensor | None,
        num_special: int,
        attention_keep_ratio: float,
    ) -> torch.BoolTensor | None:
        """Top keys per patch query from the head-averaged attention among the kept tokens, as a boolean mask.

        The keys ranked are those this layer computed for the prefix tokens and the kept patches (a fused token is
        special: its row and column are kept whatever the scores). `query`/`key` cover the sequence before selection.
        """
        prefix = self.num_prefix_tokens
        patch_query, patch_key = query[:, :, previous_special:], key[:, :, previous_special:]
        if kept_positions is not None:
            index = kept_positions[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1])
            patch_query, patch_key = patch_query.gather(2, index), patch_key.gather(2, index)
        ranked_keys = torch.cat((key[:, :, :prefix], patch_key), dim=2).float()
        with float32_scores(query.device):
            logits = torch.matmul(patch_query.float(), ranked_keys.transpose(2, 3)) * self.scaling
            probs = logits.softmax(dim=-1).mean(dim=1)[:, :, prefix:]  # (batch, patch queries, patch keys)
        num_patches = probs.shape[-1]
        kept_keys = keep_count(num_patches, attention_keep_ratio)
        if kept_keys >= num_patches:
            return None
        patch_block = torch.zeros_like(probs, dtype=torch.bool)
        patch_block.scatter_(2, probs.topk(kept_keys, dim=-1).indices, True)
        total = num_special + num_patches
        mask = torch.ones(probs.shape[0], 1, total, total, dtype=torch.bool, device=probs.device)
        mask[:, 0, num_special:, num_special:] = patch_block
        return mask


class SparseViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block; a pruning layer sparsifies tokens and connections between attention and MLP."""

    def __init__(self, config: SparseViTConfig, layer_index: int, ratios: SparsityRatios | None = None):
        super().__init__()
        self.attention = SparseViTAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SparseViTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.sparsifier = (
            SparseViTTokenSparsifier(config, ratios) if layer_index in config.token_pruning_layers else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: TokenState,
        token_keep_ratio: float = 1.0,
        attention_keep_ratio: float = 1.0,
        output_attentions: bool = False,
        output_cls_attention_variance: bool = False,
    ) -> tuple[torch.Tensor, TokenState, torch.Tensor | None, torch.Tensor | None]:
        residual = hidden_states
        attention_output, attention_weights, query, key = self.attention(
            self.layernorm_before(hidden_states), state.attention_mask, output_attentions, token_state=state
        )
        hidden_states = self.dropout(attention_output) + residual

        cls_attention_variance = None
        if output_cls_attention_variance:
            patch_attention = cls_attention(query, key, self.attention.scaling)[:, state.num_special_tokens :]
            cls_attention_variance = patch_attention.var(dim=1, unbiased=False)
        if self.sparsifier is not None and (token_keep_ratio < 1.0 or attention_keep_ratio < 1.0):
            hidden_states, state = self.sparsifier(
                hidden_states, query, key, state, token_keep_ratio, attention_keep_ratio
            )

        residual = hidden_states
        hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
        return hidden_states, state, attention_weights, cls_attention_variance


class SparseViTEncoder(nn.Module):
    """The stack of layers, plus the sparsity ratios in force (the config's until `set_sparsity` changes them)."""

    def __init__(self, config: SparseViTConfig):
        super().__init__()
        self.config = config
        self.ratios = SparsityRatios(config.token_keep_ratio, config.attention_keep_ratio)
        self.layers = nn.ModuleList(
            [SparseViTLayer(config, index, self.ratios) for index in range(config.num_hidden_layers)]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_cls_attention_variance: bool = False,
        patch_ids: torch.LongTensor | None = None,
    ) -> SparseViTModelOutput:
        """`patch_ids` `(batch, patches)`: the original indices of the patch tokens in `hidden_states` when some were
        dropped before the encoder (PatchDropout); None: all patches, in order."""
        batch_size, sequence_length = hidden_states.shape[:2]
        num_prefix = self.config.num_prefix_tokens
        if patch_ids is None:
            patch_ids = torch.arange(sequence_length - num_prefix, device=hidden_states.device).expand(batch_size, -1)
        state = TokenState(patch_ids=patch_ids, num_special_tokens=num_prefix)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        kept_patch_indices = []
        cls_attention_variance = None
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            num_tokens = hidden_states.shape[1]
            hidden_states, state, attention_weights, variance = layer(
                hidden_states,
                state=state,
                token_keep_ratio=self.ratios.token_keep_ratio,
                attention_keep_ratio=self.ratios.attention_keep_ratio,
                output_attentions=output_attentions,
                output_cls_attention_variance=output_cls_attention_variance and index == last,
            )
            if hidden_states.shape[1] != num_tokens:
                kept_patch_indices.append(state.patch_ids)
            if variance is not None:
                cls_attention_variance = variance
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attention_weights,)
        return SparseViTModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            kept_patch_indices=tuple(kept_patch_indices) if kept_patch_indices else None,
            cls_attention_variance=cls_attention_variance,
        )


class SparseViTPooler(nn.Module):
    def __init__(self, config: SparseViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = ACT2FN[config.pooler_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class SparseViTPreTrainedModel(PreTrainedModel):
    config_class = SparseViTConfig
    config: SparseViTConfig
    base_model_prefix = "sparse_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SparseViTEmbeddings", "SparseViTLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True  # the connection mask becomes a block mask (`flex_attention_forward`)
    _supports_flash_attn = True  # without attention sparsity only: a connection mask is refused, never dropped
    # The loss is a per-batch mean that ignores `num_items_in_batch`: let the Trainer scale it for accumulation.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Conv: normal(0, initializer_range), zero bias; LayerNorm: 1 and 0
        if isinstance(module, SparseViTEmbeddings):
            std = self.config.initializer_range
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.distillation_token is not None:
                init.trunc_normal_(module.distillation_token, mean=0.0, std=std)

    def _sparse_vit_encoder(self) -> SparseViTEncoder:
        base = getattr(self, self.base_model_prefix, self)
        return base.encoder

    def set_sparsity(self, token_keep_ratio: float | None = None, attention_keep_ratio: float | None = None) -> None:
        """Change the token and/or attention keep ratios in force, without touching the config or the weights.

        Schedules (the Tri-Level trainer) call this every step. The config keeps the ratios that `save_pretrained`
        writes and `from_pretrained` restores; `reset_sparsity()` goes back to them. Under `torch.compile` every
        distinct value is a new graph: keep to a few values (the Tri-Level schedule snaps them to a grid).
        """
        ratios = self._sparse_vit_encoder().ratios
        if token_keep_ratio is not None:
            ratios.token_keep_ratio = _check_ratio("token_keep_ratio", token_keep_ratio)
        if attention_keep_ratio is not None:
            ratios.attention_keep_ratio = _check_ratio("attention_keep_ratio", attention_keep_ratio)

    def get_sparsity(self) -> dict[str, float]:
        ratios = self._sparse_vit_encoder().ratios
        return {"token_keep_ratio": ratios.token_keep_ratio, "attention_keep_ratio": ratios.attention_keep_ratio}

    def reset_sparsity(self) -> None:
        self.set_sparsity(self.config.token_keep_ratio, self.config.attention_keep_ratio)


class SparseViTModel(SparseViTPreTrainedModel):
    _auto_class = "AutoModel"  # `save_pretrained` ships this folder's code (for Hub users without hf_sparse)

    # No pooler by default (unlike ViTModel): SparseViT classifiers read the CLS token, so a pooler would never be
    # trained, and loading a classifier checkpoint into AutoModel would leave it random.
    def __init__(self, config: SparseViTConfig, add_pooling_layer: bool = False):
        super().__init__(config)
        self.config = config
        self.embeddings = SparseViTEmbeddings(config)
        self.patch_dropout = SparseViTPatchDropout(config) if config.patch_dropout_keep_ratio < 1.0 else None
        self.encoder = SparseViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = SparseViTPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> SparseViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_cls_attention_variance: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SparseViTModelOutput | tuple:
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values`.")
        output_attentions = _config_default(self.config, "output_attentions", output_attentions)
        output_hidden_states = _config_default(self.config, "output_hidden_states", output_hidden_states)
        return_dict = _config_default(self.config, "return_dict", return_dict, default=True)

        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        embedding_output = self.embeddings(
            pixel_values.to(expected_dtype), interpolate_pos_encoding=bool(interpolate_pos_encoding)
        )
        patch_ids = None
        if self.patch_dropout is not None:
            embedding_output, patch_ids = self.patch_dropout(embedding_output)
        encoder_outputs = self.encoder(
            embedding_output,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_cls_attention_variance=output_cls_attention_variance,
            patch_ids=patch_ids,
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        output = SparseViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=self.pooler(sequence_output) if self.pooler is not None else None,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            kept_patch_indices=encoder_outputs.kept_patch_indices,
            cls_attention_variance=encoder_outputs.cls_attention_variance,
        )
        return output if return_dict else output.to_tuple()


class SparseViTForImageClassification(SparseViTPreTrainedModel):
    """SparseViT with a linear classifier on the final CLS token (as HF ViT and DeiT's `ForImageClassification`)."""

    _auto_class = "AutoModelForImageClassification"  # `save_pretrained` ships this folder's code

    def __init__(self, config: SparseViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.sparse_vit = SparseViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> SparseViTPatchEmbeddings:
        return self.sparse_vit.get_input_embeddings()

    @classmethod
    def from_vit(cls, source, **config_overrides) -> "SparseViTForImageClassification":
        """Convert an HF `ViTForImageClassification` or `DeiTForImageClassification` (a model object, a local
        checkpoint directory or a Hub repo id) to SparseViT with the same weights.

        `config_overrides` set SparseViT fields (`token_keep_ratio`, `attention_keep_ratio`, `token_fusion`,
        `token_pruning_layers`, ...) and `attn_implementation` ("eager" or "sdpa"); an unknown name is an error. DeiT's distillation token becomes
        a second prefix token. `DeiTForImageClassificationWithTeacher` is refused: its two-head average has no
        SparseViT equivalent. Every parameter is checked: a missing, unexpected or mis-shaped key is an error.
        """
        from .convert_vit import convert_vit_to_sparse_vit

        return convert_vit_to_sparse_vit(source, cls, **config_overrides)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_cls_attention_variance: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SparseViTImageClassifierOutput | tuple:
        return_dict = _config_default(self.config, "return_dict", return_dict, default=True)
        outputs = self.sparse_vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_cls_attention_variance=output_cls_attention_variance,
            return_dict=True,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        output = SparseViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            kept_patch_indices=outputs.kept_patch_indices,
            cls_attention_variance=outputs.cls_attention_variance,
        )
        return output if return_dict else output.to_tuple()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: SparseViTConfig) -> torch.Tensor:
    """Cross-entropy, BCE or MSE by `config.problem_type`, inferred on first use as transformers does.

    Inside a compiled graph the inferred type is used but not written to the config: writing it would change what
    the graph's guards check and cost one more compile (the hf_sparse trainers set it before the first step)."""
    labels = labels.to(logits.device)
    problem_type = config.problem_type
    if problem_type is None:
        if config.num_labels == 1:
            problem_type = "regression"
        elif config.num_labels > 1 and labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
        if not torch.compiler.is_compiling():
            config.problem_type = problem_type
    if problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
    if problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


def _config_default(config: SparseViTConfig, name: str, value: bool | None, default: bool = False) -> bool:
    if value is not None:
        return value
    configured = getattr(config, name, None)
    return default if configured is None else bool(configured)


__all__ = [
    "SparseViTForImageClassification",
    "SparseViTImageClassifierOutput",
    "SparseViTModel",
    "SparseViTModelOutput",
    "SparseViTPreTrainedModel",
]
